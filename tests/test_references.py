"""Every reference to a document resolves inside the repository.

A reference is a path ending in `.md` (with an optional `#anchor`) in any text file of the project:
code, docstrings, YAML, the Makefile, the docs. It must name a file of the repository, found relative
to the referring file or to the repository root, and its anchor must be a heading of that file.
Absolute paths of a development machine are references that lead outside too. `bdlab list`, which
prints where each component is documented, is checked the same way.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".ipynb", ".sh"}
TEXT_NAMES = {"Makefile", "run"}

DOC_REFERENCE = re.compile(r"(?<![\w/.:-])((?:\.\.?/)*[\w.-]+(?:/[\w.-]+)*\.md)(?:#([\w-]+))?")
MACHINE_PATH = re.compile(r"(?<![\w.:/~-])/(?:work|home|Users|root|mnt|opt)/[\w.-]+")
# files the platform writes (artifacts), named where they are written or documented: not documents
WRITTEN_BY_THE_PLATFORM = {"summary.md", "tables.md"}  # tables.md: `bdlab report`


def project_files(root: Path) -> list[Path]:
    """The files git would commit (tracked, and new files not ignored); every file outside .git and
    the ignored folders where the tree is not a git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout
        names = [root / line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".site", "results", "runs", "__pycache__", ".pytest_cache", ".ruff_cache"}
        names = [p for p in root.rglob("*") if not skip & set(p.relative_to(root).parts)]
    return [p for p in names if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name in TEXT_NAMES)]


def slug(heading: str) -> str:
    """MkDocs' anchor of a heading (the toc extension's default slugify)."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[-\s]+", "-", text).strip("-")


def anchors(markdown: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", markdown.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M)}


def broken_references(text: str, where: Path, root: Path, files: list[Path] | None = None) -> list[str]:
    """What in `text` (the content of file `where`) refers to a document that is not in `root`
    (`files`: the project's files, default `project_files(root)`)."""
    problems = []
    root = root.resolve()
    for match in DOC_REFERENCE.finditer(text):
        ref, anchor = match.group(1), match.group(2)
        if ref in WRITTEN_BY_THE_PLATFORM:
            continue
        base = root / "docs" if where.name == "mkdocs.yml" else where.parent  # mkdocs: docs_dir
        candidates = [(base / ref).resolve(), (root / ref).resolve()]
        if "/" not in ref:  # a bare name ("README.md") may name the project's file of that name
            files = project_files(root) if files is None else files
            candidates += [f for f in files if f.name == ref]
        found = next(
            (c for c in candidates if c.is_file() and c.resolve().is_relative_to(root.resolve())), None
        )
        if found is None:
            problems.append(f"{ref}: no such document in the repository")
        elif anchor and anchor not in anchors(found):
            problems.append(f"{ref}#{anchor}: no such heading in {found.relative_to(root.resolve())}")
    problems += [f"{m.group(0)}: a path outside the repository" for m in MACHINE_PATH.finditer(text)]
    return problems


def scan(root: Path, skip: tuple[Path, ...] = ()) -> list[str]:
    root = root.resolve()
    problems = []
    files = project_files(root)
    for path in files:
        if path.resolve() in skip:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        problems += [f"{path.relative_to(root)}: {p}" for p in broken_references(text, path, root, files)]
    return problems


def test_every_reference_in_the_project_resolves():
    # this file is skipped: its own test below names a missing document on purpose
    problems = scan(REPO, skip=(Path(__file__).resolve(),))
    assert not problems, "\n".join(problems)


def test_a_docstring_naming_a_missing_document_fails(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "metrics.md").write_text("# Metrics\n\n## The ASR variants\n")
    (tmp_path / "good.py").write_text('"""ASR as in docs/metrics.md#the-asr-variants."""\n')
    assert scan(tmp_path) == []
    missing = "docs/" + "defenses/nowhere.md"
    (tmp_path / "bad.py").write_text(f'"""The algorithm: {missing}, section 2."""\n')
    (tmp_path / "anchor.py").write_text('"""See docs/metrics.md#no-such-section."""\n')
    (tmp_path / "machine.yaml").write_text("# measured on " + "/work" + "/bd_badnets2\n")
    problems = scan(tmp_path)
    assert any(p.startswith("bad.py:") and "nowhere.md" in p for p in problems), problems
    assert any(p.startswith("anchor.py:") and "no-such-section" in p for p in problems), problems
    assert any(p.startswith("machine.yaml:") for p in problems), problems
    assert len(problems) == 3


def test_a_reference_leaving_the_repository_fails(tmp_path):
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (tmp_path / "notes.md").write_text("# outside\n")
    (repo / "docs" / "index.md").write_text("See ../../notes.md for the algorithm.\n")
    assert scan(repo) == ["docs/index.md: ../../notes.md: no such document in the repository"]


@pytest.mark.parametrize("family", ["datasets", "models", "attacks", "defenses"])
def test_bdlab_list_points_into_the_docs(family):
    from trials.attacks import ATTACKS
    from trials.defenses import DEFENSES
    from trials.listing import format_family

    text = format_family(family)
    assert not broken_references(text, REPO / "README.md", REPO), text
    pages = re.findall(r"\(docs: (docs/[\w/.-]+\.md)\)", text)
    assert pages and all((REPO / page).is_file() for page in pages)
    if family in ("attacks", "defenses"):  # a page for every built-in attack and defense
        registry = ATTACKS if family == "attacks" else DEFENSES
        assert {f"docs/{family}/{name}.md" for name in registry.names()} <= set(pages)
