"""Text listing of every registered component with its parameters and defaults (`bdlab list`)."""

from __future__ import annotations

import inspect
import sys

from trials.params import describe


def _registries() -> dict:
    from trials.attacks import ATTACKS
    from trials.data import DATASETS, SplitParams
    from trials.defenses import DEFENSES
    from trials.models import MODELS

    regs = {"datasets": DATASETS, "models": MODELS, "attacks": ATTACKS, "defenses": DEFENSES}
    return regs, SplitParams


def doc_page(family: str, name: str, obj: object) -> str | None:
    """The page of the project's documentation that describes a built-in component (a plugin's
    components have none): one page per attack and per defense, one page per family otherwise."""
    if not getattr(obj, "__module__", "").startswith("trials."):
        return None
    if family in ("attacks", "defenses"):
        return f"docs/{family}/{name}.md"
    return f"docs/{family}.md"


def families() -> list[str]:
    return ["datasets", "models", "attacks", "defenses"]


def format_family(family: str) -> str:
    regs, split_params = _registries()
    lines = [f"{family}:"]
    registry = regs.get(family)
    if registry is None or not registry.names():
        lines.append("  (none registered yet)")
        return "\n".join(lines)
    for name, obj in registry.items():
        own = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
        doc = inspect.cleandoc(own or sys.modules[obj.__module__].__doc__ or "")
        lines.append(f"  {name}" + (f"  - {doc.splitlines()[0]}" if doc else ""))
        page = doc_page(family, name, obj)
        if page:
            lines.append(f"      (docs: {page})")
        params_cls = getattr(obj, "Params", None)
        rows = describe(params_cls) if params_cls is not None else []
        if family == "datasets":
            rows = rows + describe(split_params)
        if family == "defenses":
            from trials.presets import available_presets, default_space_params

            presets = ", ".join(available_presets(name)) or "none"
            space = ", ".join(default_space_params(name)) or "none"
            lines.append(f"      (data: {obj.data_kind}; presets: {presets}; default space: {space})")
        lines.extend(format_params(rows))
    return "\n".join(lines)


def format_params(rows: list[dict], indent: str = "      ") -> list[str]:
    """`describe` rows as `name: type = default allowed  # doc` lines."""
    lines = []
    for row in rows:
        allowed = f" {row['allowed']}" if row["allowed"] else ""
        lines.append(f"{indent}{row['name']}: {row['type']} = {row['default']!r}{allowed}  # {row['doc']}")
    return lines
