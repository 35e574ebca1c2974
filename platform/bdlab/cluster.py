"""`bdlab cluster check FILE`: a Ray cluster launcher file checked offline, before `ray up`.

Two layers. Ray's own: `prepare_config` fills in the provider's defaults and `validate_config`
checks the result against Ray's JSON schema (an unknown key, a wrong type, `available_node_types`
on the local provider); the launcher itself needs the network, so nothing else of Ray's runs.
Then the platform's rules, which Ray cannot know:

- `setup_commands` are written out (Ray's AWS defaults would install a Ray nightly on nodes
  without Ray) and install the project with its `cluster` extra;
- every `name==version` pin in a command equals the project's own pin (pyproject.toml is the one
  source of versions);
- the head starts the tracking service (`bdlab server start`);
- Ray's token authentication reaches every node: `RAY_AUTH_MODE=token` exported in
  `initialization_commands`, the token file in `file_mounts`, and no command turning it off;
- Ray's dashboard is not bound to every interface (forward it with `ray dashboard`);
- no secret is written in the file: passwords, keys and tokens come from the env file mounted
  from your machine.

Each problem is one line naming the file, the key and what is wrong.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from trials.errors import BdlabError

COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
TOKEN_FILE = "~/.ray/auth_token"
# NAME=value where NAME says it holds a secret and the value is written out (not $VAR, not empty)
SECRET_ASSIGNMENT = re.compile(
    r"\b([A-Z0-9_]*(?:PASSWORD|SECRET|SECRET_KEY|TOKEN|PASSWD)[A-Z0-9_]*)=(?![\s'\"]*\$)(['\"]?)([^\s'\"$]+)"
)
URL_PASSWORD = re.compile(r"://[^/\s:@]+:([^@\s$]+)@")
PIN = re.compile(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([0-9][^\s'\",;]*)")
SECRET_KEYS = re.compile(r"(password|secret|token)", re.IGNORECASE)


class ClusterFileError(BdlabError):
    """A cluster file that would not start the platform as documented."""


def project_pins() -> dict[str, str]:
    """Every `name==version` the project pins, its extras included: from pyproject.toml in a source
    checkout (an editable install's metadata lags behind edits of it), else the installed metadata."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        project = tomllib.loads(pyproject.read_text())["project"]
        requirements = list(project.get("dependencies", []))
        for extra in project.get("optional-dependencies", {}).values():
            requirements += extra
    else:
        requirements = metadata.requires("bdlab") or []
    pins = {}
    for requirement in requirements:
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)", requirement)
        if match:
            pins[_canonical(match.group(1))] = match.group(2)
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _commands(config: dict[str, Any], key: str) -> list[str]:
    value = config.get(key) or []
    return [str(c) for c in value] if isinstance(value, list) else []


def _strings(node: Any, where: str) -> Iterator[tuple[str, str]]:
    """(key path, text) of every string value in the file."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, node


def ray_problems(config: dict[str, Any]) -> list[str]:
    """What Ray's own preparation and schema say (one line), or nothing."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as err:
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        return [f"{where}: {err.message} (Ray's cluster schema)"]
    except Exception as err:  # ClickException, ValueError, RuntimeError: Ray's own checks
        text = " ".join(str(getattr(err, "message", err)).split())
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)
        return [f"(Ray) {text}"]
    return []


def platform_problems(config: dict[str, Any], pins: dict[str, str] | None = None) -> list[str]:
    pins = project_pins() if pins is None else pins
    problems = []
    setup = _commands(config, "setup_commands")
    if not setup:
        problems.append(
            "setup_commands: missing or empty; without it Ray's defaults install a Ray nightly on the nodes "
            "(write the project's install out, as cluster.yaml does)"
        )
    elif not any("pip install" in c and "[cluster]" in c for c in setup):
        problems.append(
            "setup_commands: no command installs the project with its cluster extra "
            '(e.g. `uv pip install -e "$HOME/bdlab[cluster]"`), so nodes would run other versions'
        )
    for key in COMMAND_KEYS:
        for i, command in enumerate(_commands(config, key)):
            for name, version in PIN.findall(command):
                wanted = pins.get(_canonical(name))
                if wanted is None:
                    problems.append(
                        f"{key}[{i}]: pins {name}=={version}, which the project does not pin; "
                        "install it through the project (pyproject.toml is the one source of versions)"
                    )
                elif wanted != version:
                    problems.append(
                        f"{key}[{i}]: pins {name}=={version}, the project pins {name}=={wanted} (pyproject.toml)"
                    )
            if "RAY_AUTH_MODE=disabled" in command:
                problems.append(f"{key}[{i}]: turns Ray's token authentication off (RAY_AUTH_MODE=disabled)")
            if re.search(r"--dashboard-host[= ]+0\.0\.0\.0", command):
                problems.append(
                    f"{key}[{i}]: binds Ray's dashboard to every interface; use --dashboard-host=127.0.0.1 "
                    "and reach it with `ray dashboard FILE`"
                )
    if not any("bdlab server start" in c for c in _commands(config, "head_start_ray_commands")):
        problems.append(
            "head_start_ray_commands: the head does not start the tracking service (`bdlab server start`)"
        )
    if not any("RAY_AUTH_MODE=token" in c for c in _commands(config, "initialization_commands")):
        problems.append(
            "initialization_commands: RAY_AUTH_MODE=token is not exported; nodes and drivers without it "
            "cannot join a cluster whose head has token authentication (Ray 2.60 turns it on)"
        )
    mounts = config.get("file_mounts") or {}
    if not isinstance(mounts, dict) or TOKEN_FILE not in mounts:
        problems.append(
            f"file_mounts: {TOKEN_FILE} is not carried to the nodes (`ray get-auth-token --generate` "
            "writes it on your machine)"
        )
    for where in _secret_fields(config, ""):
        problems.append(f"{where}: a secret written in the file; read it from the mounted env file")
    for where, text in _strings(config, ""):
        for match in SECRET_ASSIGNMENT.finditer(text):
            problems.append(
                f"{where}: sets {match.group(1)} to a literal; read it from the mounted env file "
                "(~/.bdlab/cluster.env)"
            )
        if URL_PASSWORD.search(text):
            problems.append(f"{where}: a URL with a password in it; read it from the mounted env file")
    return problems


def _secret_fields(node: Any, where: str) -> Iterator[str]:
    """Keys named like a secret (password, secret, token) that hold a written-out value; the keys
    of `file_mounts` are paths, not settings."""
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{where}.{k}" if where else str(k)
            if path == "file_mounts":
                continue
            if SECRET_KEYS.search(str(k)) and isinstance(v, str | int | float) and not str(v).startswith("$"):
                yield path
            else:
                yield from _secret_fields(v, path)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _secret_fields(v, f"{where}[{i}]")


def check_cluster_file(path: str | Path, pins: dict[str, str] | None = None) -> dict[str, Any]:
    """The file's configuration, or ClusterFileError with one line per problem (Ray's first)."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ClusterFileError(f"{path}: cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ClusterFileError(f"{path}: not YAML ({' '.join(str(err).split())})") from None
    if not isinstance(config, dict):
        raise ClusterFileError(f"{path}: expected a mapping of Ray cluster settings")
    problems = ray_problems(config) + platform_problems(config, pins)
    if problems:
        raise ClusterFileError("\n".join(f"{path}: {p}" for p in problems))
    return config


def new_secrets() -> str:
    """The env file `cluster.yaml` mounts as ~/.bdlab/cluster.env, with fresh random secrets: the
    server's three (the head keeps them; the workers delete them at setup) and the login the
    workers and drivers write with, which the head adds as a writer on every start."""
    import secrets

    def fresh() -> str:
        return secrets.token_urlsafe(24)

    return (
        "# ~/.bdlab/cluster.env: keep it private (chmod 600); never commit it\n"
        f"MLFLOW_AUTH_ADMIN_PASSWORD={fresh()}\n"
        f"MLFLOW_FLASK_SERVER_SECRET_KEY={fresh()}\n"
        f"BDLAB_DB_PASSWORD={fresh()}\n"
        "MLFLOW_TRACKING_USERNAME=bdlab-workers\n"
        f"MLFLOW_TRACKING_PASSWORD={fresh()}\n"
    )
