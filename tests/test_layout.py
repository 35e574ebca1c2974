"""The `platform/` source root must never become a package (it would shadow the stdlib module)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_platform_has_no_init():
    assert (ROOT / "platform" / "bdlab" / "__init__.py").is_file()
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_stdlib_platform_is_not_shadowed():
    import platform

    assert hasattr(platform, "python_version"), platform.__file__


def test_ruff_checks_builtin_shadowing():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    selected = config["tool"]["ruff"]["lint"]["select"]
    assert "A" in selected or "A005" in selected


def test_layout_folders_exist():
    for folder in (
        "trials/data",
        "trials/models",
        "trials/attacks",
        "trials/defenses",
        "search_spaces",
        "notebooks",
        "tests",
    ):
        assert (ROOT / folder).is_dir(), folder
