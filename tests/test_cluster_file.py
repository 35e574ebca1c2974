"""`bdlab cluster check`: the shipped cluster files pass Ray's own schema and the platform's rules,
and each kind of mistake is one line naming the file and the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from bdlab.cluster import ClusterFileError, check_cluster_file, project_pins

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ["cluster.yaml", "cluster-onprem.yaml"]


def test_the_project_pins_what_the_cluster_installs():
    pins = project_pins()
    assert pins["ray"] == "2.60.0" and pins["optuna"] == "5.0.0" and pins["mlflow"] == "3.17.2"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"  # the cluster extra


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_cluster_files_pass(name):
    config = check_cluster_file(ROOT / name)
    assert config["cluster_name"].startswith("bdlab")


def _broken(tmp_path: Path, name: str, change) -> Path:
    config = yaml.safe_load((ROOT / name).read_text())
    change(config)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ClusterFileError) as err:
        check_cluster_file(path)
    return str(err.value).splitlines()


def test_unknown_key_is_rays_schema_error(tmp_path):
    path = _broken(tmp_path, "cluster.yaml", lambda c: c.update(max_wokers=3))
    assert _problems(path) == [
        f"{path}: (top level): Additional properties are not allowed ('max_wokers' was unexpected) (Ray's cluster schema)"
    ]


def test_node_types_on_the_local_provider_is_rays_error(tmp_path):
    path = _broken(tmp_path, "cluster-onprem.yaml", lambda c: c.update(available_node_types={"gpu": {}}))
    assert _problems(path) == [
        f"{path}: (Ray) The field available_node_types is not supported for on-premise clusters."
    ]


def test_missing_setup_commands(tmp_path):
    path = _broken(tmp_path, "cluster.yaml", lambda c: c.pop("setup_commands"))
    [line] = _problems(path)
    assert line.startswith(
        f"{path}: setup_commands: missing or empty; without it Ray's defaults install a Ray nightly"
    )


def test_a_pin_other_than_the_projects(tmp_path):
    def change(c):
        c["setup_commands"].insert(0, "pip install ray[default]==2.59.0 numpy==2.0.0")

    path = _broken(tmp_path, "cluster.yaml", change)
    assert _problems(path) == [
        f"{path}: setup_commands[0]: pins ray==2.59.0, the project pins ray==2.60.0 (pyproject.toml)",
        f"{path}: setup_commands[0]: pins numpy==2.0.0, which the project does not pin; install it through "
        "the project (pyproject.toml is the one source of versions)",
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda c: c["head_start_ray_commands"].insert(1, "export MLFLOW_AUTH_ADMIN_PASSWORD=hunter2"),
            "head_start_ray_commands[1]: sets MLFLOW_AUTH_ADMIN_PASSWORD to a literal; read it from the "
            "mounted env file (~/.bdlab/cluster.env)",
        ),
        (
            lambda c: c["auth"].update(ssh_password="hunter2"),
            "auth.ssh_password: a secret written in the file; read it from the mounted env file",
        ),
        (
            lambda c: c["setup_commands"].append(
                "psql postgresql://mlflow:hunter2@10.0.0.1/mlflow -c 'select 1'"
            ),
            "setup_commands[4]: a URL with a password in it; read it from the mounted env file",
        ),
    ],
)
def test_secret_literals(tmp_path, change, expected):
    path = _broken(tmp_path, "cluster.yaml", change)
    assert f"{path}: {expected}" in _problems(path)  # (Ray's schema also refuses auth.ssh_password)


def test_a_secret_read_from_the_environment_is_fine(tmp_path):
    def change(c):
        c["head_start_ray_commands"].insert(1, 'export MLFLOW_TRACKING_PASSWORD="$WRITER_PASSWORD"')

    check_cluster_file(_broken(tmp_path, "cluster.yaml", change))


def test_token_auth_tracking_service_and_dashboard(tmp_path):
    def change(c):
        c["initialization_commands"] = []
        del c["file_mounts"]["~/.ray/auth_token"]
        c["head_start_ray_commands"] = [
            cmd.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
            for cmd in c["head_start_ray_commands"]
            if "bdlab server start" not in cmd
        ]

    path = _broken(tmp_path, "cluster-onprem.yaml", change)
    problems = [p.removeprefix(f"{path}: ") for p in _problems(path)]
    assert [p.split(":")[0] for p in problems] == [
        "head_start_ray_commands[2]",  # after the server's start and the workers' login
        "head_start_ray_commands",
        "initialization_commands",
        "file_mounts",
    ]
    assert "binds Ray's dashboard to every interface" in problems[0]
    assert "does not start the tracking service" in problems[1]
    assert "RAY_AUTH_MODE=token is not exported" in problems[2]
    assert "~/.ray/auth_token is not carried" in problems[3]


def test_cli_one_line_per_problem_and_exit_status(tmp_path):
    def change(c):
        c.pop("setup_commands")
        c["head_start_ray_commands"].insert(1, "export BDLAB_DB_PASSWORD='x'")

    path = _broken(tmp_path, "cluster.yaml", change)
    bad = subprocess.run(
        [sys.executable, "-m", "bdlab.cli", "cluster", "check", str(path)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stdout == ""
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("bdlab: error:")]
    assert [ln.split(": ")[3] for ln in lines] == ["setup_commands", "head_start_ray_commands[1]"]
    good = subprocess.run(
        [sys.executable, "-m", "bdlab.cli", "cluster", "check", str(ROOT / "cluster.yaml")],
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr
    assert "a valid cluster file (aws provider" in good.stdout


def test_unreadable_and_non_mapping_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert _problems(missing) == [f"{missing}: cannot be read (No such file or directory)"]
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    assert _problems(scalar) == [f"{scalar}: expected a mapping of Ray cluster settings"]


def test_cluster_secrets_prints_a_fresh_env_file_the_head_reads():
    def env_file() -> dict[str, str]:
        done = subprocess.run(
            [sys.executable, "-m", "bdlab.cli", "cluster", "secrets"], capture_output=True, text=True, check=True
        )
        lines = [line for line in done.stdout.splitlines() if line and not line.startswith("#")]
        return dict(line.split("=", 1) for line in lines)

    first, second = env_file(), env_file()
    assert list(first) == [
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "BDLAB_DB_PASSWORD",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    ]
    secrets = [k for k in first if k != "MLFLOW_TRACKING_USERNAME"]
    assert all(len(first[k]) >= 24 and first[k] != second[k] for k in secrets)  # random, and MLflow's 12+
    # the head's start commands read the workers' login from it and add it as a writer
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert any(
        'BDLAB_USER_PASSWORD="$MLFLOW_TRACKING_PASSWORD"' in c and "--role writer --exist-ok" in c
        for c in config["head_start_ray_commands"]
    )
