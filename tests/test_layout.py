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


def test_a_non_editable_install_finds_every_preset_and_default_space(tmp_path):
    """What a cluster node or a user's `pip install .` gets: the built wheel, installed into a folder
    of its own and run from outside the checkout, lists every defense's presets and default space."""
    import shutil
    import subprocess
    import sys

    from trials.defenses import DEFENSES
    from trials.presets import available_presets, default_space_params

    # built from a copy: setuptools' build/ folder in the checkout would outlive deleted modules
    source, wheels, site = tmp_path / "source", tmp_path / "wheels", tmp_path / "site"
    skip = shutil.ignore_patterns(".*", "build", "results", "runs", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, source, ignore=skip)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source], check=True)
    (wheel,) = wheels.glob("bdlab-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    probe = "import trials, bdlab; print(trials.__file__); print(bdlab.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where  # not the checkout
    listed = subprocess.run(
        [sys.executable, "-m", "bdlab.cli", "list", "defenses"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    for name in DEFENSES.names():
        presets = ", ".join(available_presets(name))
        space = ", ".join(default_space_params(name)) or "none"
        assert f"presets: {presets}; default space: {space})" in listed.stdout, name
    check = "from bdlab.spaces import load_space; from trials.defenses import DEFENSES; [load_space(n) for n in DEFENSES.names()]"
    loaded = subprocess.run([sys.executable, "-c", check], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
