"""The `bdlab` command line.

Errors caused by input are printed as one line (`bdlab: error: ...`) with exit status 2 and no
traceback; everything heavy is imported inside the subcommands so `bdlab --help` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print the error alone, on one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"bdlab: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="bdlab", description="Backdoor attack and defense experiments.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    attack = sub.add_parser("attack", help="train a backdoored model and write it to a folder")
    attack.add_argument("--dataset", required=True, help="registered dataset (see `bdlab list`)")
    attack.add_argument(
        "--data-root", default=None, help="local folder of the dataset (not needed for digits)"
    )
    attack.add_argument("--dataset-param", action="append", metavar="KEY=VALUE", help="dataset parameter")
    attack.add_argument("--model", required=True, help="registered model")
    attack.add_argument("--attack", required=True, help="registered attack")
    attack.add_argument("--param", action="append", metavar="KEY=VALUE", help="attack parameter (repeatable)")
    attack.add_argument(
        "--recipe", action="append", metavar="KEY=VALUE", help="training recipe field, e.g. lr=0.01"
    )
    attack.add_argument(
        "--recipe-preset",
        default=None,
        help="named training recipe, e.g. cifar_cpu (docs/evaluation.md#recipe-presets); --recipe overrides it",
    )
    attack.add_argument("--seed", type=int, default=0)
    attack.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default: the dataset's recipe)"
    )
    attack.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    attack.add_argument(
        "--no-amp",
        action="store_true",
        help="train in float32 (TF32 allowed) on CUDA, not under bf16 autocast",
    )
    attack.add_argument(
        "--clean-reference", action="store_true", help="also train a clean model for comparison"
    )
    attack.add_argument("--out", required=True, help="output folder")
    attack.add_argument("--quiet", action="store_true", help="no per-epoch progress")

    defend = sub.add_parser("defend", help="run a defense on an attacked-model folder and write the result")
    defend.add_argument("--attacked", required=True, help="folder written by `bdlab attack`")
    defend.add_argument("--defense", required=True, help="registered defense (see `bdlab list defenses`)")
    defend.add_argument(
        "--preset", default=None, help="named preset of trials/defenses/presets/<defense>.yaml, e.g. cpu"
    )
    defend.add_argument(
        "--param", action="append", metavar="KEY=VALUE", help="defense parameter (repeatable)"
    )
    defend.add_argument("--seed", type=int, default=0)
    defend.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    precision = defend.add_mutually_exclusive_group()
    precision.add_argument(
        "--no-amp",
        action="store_true",
        help="train in float32 (TF32 allowed) on CUDA, whatever the defense declares",
    )
    precision.add_argument(
        "--amp",
        action="store_true",
        help="train under bf16 autocast on CUDA, also a defense that declares fp32 (DHBE, BCU, PBE...)",
    )
    defend.add_argument(
        "--checkpoint-every",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="checkpoint interval of long defenses; a re-run with the same --out resumes",
    )
    defend.add_argument("--out", required=True, help="output folder")
    defend.add_argument("--quiet", action="store_true", help="no per-step progress")

    ev = sub.add_parser("evaluate", help="re-evaluate an attacked-model folder (or other weights on it)")
    ev.add_argument("--attacked", required=True, help="folder written by `bdlab attack`")
    ev.add_argument(
        "--weights", default=None, help="safetensors weights to evaluate instead of the folder's model"
    )
    ev.add_argument("--device", default="auto")

    imp = sub.add_parser(
        "import-checkpoint", help="convert a foreign PyTorch checkpoint to safetensors, safely"
    )
    imp.add_argument("checkpoint", help="a torch.save file of plain tensors (read with weights_only=True)")
    imp.add_argument("out", help="the .safetensors file to write")
    imp.add_argument(
        "--input-mean",
        default=None,
        help="per-channel mean the foreign model's inputs were normalized with, e.g. 0.4914,0.4822,0.4465 "
        "(BackdoorBench on CIFAR-10; 0,0,0 for code that does not normalize, as BPE's); adds the "
        "normalize.mean buffer every bdlab model holds",
    )
    imp.add_argument(
        "--input-std",
        default=None,
        help="per-channel std to go with --input-mean, e.g. 0.247,0.243,0.261 (1,1,1 for no normalization)",
    )

    sweep = sub.add_parser(
        "sweep", help="run (or resume) a sweep: attacked models once, then an Optuna study per defense cell"
    )
    sweep.add_argument("spec", help="sweep YAML, e.g. search_spaces/quickstart.yaml")
    _store_options(sweep)
    sweep.add_argument(
        "--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local one)"
    )
    sweep.add_argument(
        "--fresh",
        action="store_true",
        help="start a new generation of every study (attacked models stay cached)",
    )
    sweep.add_argument(
        "--checkpoints",
        default=os.environ.get("BDLAB_CHECKPOINTS"),
        help="where long defense trials checkpoint, so a trial moved to another node resumes: a folder "
        "every node mounts, or s3://BUCKET/PREFIX (default: BDLAB_CHECKPOINTS, else the results folder)",
    )

    export = sub.add_parser("export", help="write a sweep's trials as one Parquet table")
    export.add_argument("sweep", help="the sweep's name (its spec's `name`)")
    _store_options(export)
    export.add_argument("--out", required=True, help="the .parquet file to write")

    rep = sub.add_parser(
        "report",
        help="write a sweep's tables and study analysis (report.html, tables.md, tables.tex, trials.csv)",
    )
    rep.add_argument("sweep", help="the sweep's name (its spec's `name`)")
    _store_options(rep)
    rep.add_argument("--out", required=True, help="folder to write the four files to")
    rep.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of the dataset, for the collapse check (default: known for the registered datasets)",
    )

    ui = sub.add_parser("ui", help="serve the MLflow UI of a results folder on 127.0.0.1")
    ui.add_argument("--results", default="results", help="results folder (default: ./results)")
    ui.add_argument("--port", type=int, default=5000)

    cluster = sub.add_parser("cluster", help="work with Ray cluster launcher files (cluster.yaml)")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True, parser_class=OneLineParser)
    check = cluster_sub.add_parser(
        "check", help="validate a cluster file offline: Ray's schema and the platform's rules"
    )
    check.add_argument(
        "file", nargs="?", default="cluster.yaml", help="the cluster file (default: cluster.yaml)"
    )
    cluster_sub.add_parser(
        "secrets",
        help="print a new env file for ~/.bdlab/cluster.env: random server secrets and the workers' login",
    )

    server = sub.add_parser(
        "server", help="the team's tracking service: PostgreSQL + MLflow with authentication"
    )
    server_sub = server.add_subparsers(dest="server_command", required=True, parser_class=OneLineParser)
    s_start = server_sub.add_parser(
        "start",
        help="start it (idempotent); secrets from MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY, "
        "BDLAB_DB_PASSWORD",
    )
    s_start.add_argument("--root", required=True, help="folder of its state, database and artifacts")
    s_start.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    s_start.add_argument("--port", type=int, default=5000)
    s_start.add_argument("--workers", type=int, default=2, help="MLflow server workers (default 2)")
    s_start.add_argument(
        "--postgres-url",
        default=None,
        help="postgresql://bdlab@HOST:PORT of an existing server (default: its own)",
    )
    s_start.add_argument(
        "--pg-user", default=None, help="user to run its own PostgreSQL as, when we are root"
    )
    s_user = server_sub.add_parser("user", help="team members' MLflow logins")
    s_user_sub = s_user.add_subparsers(dest="user_command", required=True, parser_class=OneLineParser)
    s_add = s_user_sub.add_parser(
        "add",
        help="add a login; its password from BDLAB_USER_PASSWORD, the admin's from MLFLOW_AUTH_ADMIN_PASSWORD",
    )
    s_add.add_argument("name")
    s_add.add_argument("--role", required=True, choices=["reader", "writer"])
    s_add.add_argument("--root", required=True, help="the folder given to `bdlab server start`")
    s_add.add_argument(
        "--exist-ok", action="store_true", help="an existing login gets this password and role (no error)"
    )
    for name, text in (
        ("stop", "stop it (and its own PostgreSQL)"),
        ("status", "print whether it runs, its URIs"),
    ):
        p = server_sub.add_parser(name, help=text)
        p.add_argument("--root", required=True, help="the folder given to `bdlab server start`")
        p.add_argument("--pg-user", default=None, help=argparse.SUPPRESS)
        if name == "status":
            p.add_argument(
                "--exports",
                action="store_true",
                help="print only `export MLFLOW_TRACKING_URI=...` and `export BDLAB_OPTUNA_STORAGE=...` lines",
            )

    lst = sub.add_parser(
        "list", help="print every registered dataset, model, attack and defense, and a sweep spec's settings"
    )
    lst.add_argument("family", nargs="?", choices=["datasets", "models", "attacks", "defenses", "sweep"])
    return parser


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="results", help="results folder (default: ./results)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else SQLite under the results folder)",
    )
    p.add_argument(
        "--optuna-storage",
        default=os.environ.get("BDLAB_OPTUNA_STORAGE"),
        help="SQLAlchemy URL of the Optuna storage (default: BDLAB_OPTUNA_STORAGE, else SQLite under the results folder)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from trials.errors import BdlabError

    try:
        return COMMANDS[args.command](args)
    except BdlabError as err:
        print(f"bdlab: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if "mlflow" not in sys.modules:
            raise
        from bdlab.tracking.mlflow_tracker import access_error

        refused = access_error(
            err, getattr(args, "tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI")
        )
        if refused is None:
            raise
        print(f"bdlab: error: {refused}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bdlab: interrupted", file=sys.stderr)
        return 130


def cmd_attack(args: argparse.Namespace) -> int:
    from trials.params import parse_assignments
    from trials.run import AttackSpec, run_attack, save_attack_result, validate

    spec = AttackSpec(
        dataset=args.dataset,
        model=args.model,
        attack=args.attack,
        attack_params=parse_assignments(args.param),
        dataset_params=parse_assignments(args.dataset_param, "--dataset-param"),
        data_root=args.data_root,
        seed=args.seed,
        epochs=args.epochs,
        recipe=parse_assignments(args.recipe, "--recipe"),
        recipe_preset=args.recipe_preset,
        device=args.device,
        amp=False if args.no_amp else None,
        clean_reference=args.clean_reference,
    )
    validate(spec)  # fail on bad input before any data is read
    _check_out(args.out)
    result = run_attack(spec, progress=None if args.quiet else print_progress)
    out = save_attack_result(result, args.out)
    m = result.metrics
    print(
        f"done in {m['seconds']:.1f}s: report half ACC {m['acc']:.4f} ASR {_fmt(m['asr'])} "
        f"(validation ACC {m['val']['acc']:.4f} ASR {_fmt(m['val']['asr'])}); wrote {out}"
    )
    return 0


def cmd_defend(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from trials.params import parse_assignments
    from trials.run import DefenseSpec, load_attacked, resolve_defense, run_defense, save_defense_result

    spec = DefenseSpec(
        defense=args.defense,
        params=parse_assignments(args.param),
        preset=args.preset,
        seed=args.seed,
        device=args.device,
        amp=False if args.no_amp else True if args.amp else None,  # None: the defense's precision
        checkpoint_every_s=args.checkpoint_every,
    )
    resolve_defense(spec)  # fail on bad input before any data is read
    _check_out(args.out)
    attacked = load_attacked(args.attacked, args.device)
    checkpoints = Path(args.out) / "checkpoint"
    result = run_defense(
        spec, attacked, progress=None if args.quiet else print_progress, checkpoint_dir=checkpoints
    )
    out = save_defense_result(result, args.out)
    shutil.rmtree(checkpoints, ignore_errors=True)  # finished: the result replaces the checkpoint
    m, b = result.metrics, result.metrics["before"]
    print(
        f"done in {m['seconds']:.1f}s: report half ACC {b['acc']:.4f} -> {m['acc']:.4f}, "
        f"ASR {_fmt(b['asr'])} -> {_fmt(m['asr'])}, DER {_fmt(m.get('der'))} "
        f"(validation ACC {m['val']['acc']:.4f} ASR {_fmt(m['val']['asr'])}); "
        f"wrote {out}"
    )
    return 0


def _check_out(out: str) -> None:
    from pathlib import Path

    from trials.errors import InvalidValue

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InvalidValue("--out", out, "must be a folder (it exists as a file)")
    if path.is_dir() and (path / "model.safetensors").exists():
        raise InvalidValue(
            "--out", out, "already holds a model; choose a new folder (results are never overwritten)"
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def print_progress(record: dict[str, Any]) -> None:
    """One line per progress record: training epochs and defense steps alike."""
    head = f"[{record.get('phase', 'train')}]"
    if "epochs" in record and "epoch" in record:
        head += f" epoch {record['epoch']}/{record['epochs']}"
    parts = [head]
    shown = {"phase", "epoch", "epochs", "val_acc", "val_asr", "seconds"}
    for key, value in record.items():
        if key not in shown:
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    if "val_acc" in record:
        parts.append(f"val ACC {record['val_acc']:.4f}")
    if record.get("val_asr") is not None:
        parts.append(f"ASR {record['val_asr']:.4f}")
    if "seconds" in record:
        parts.append(f"({record['seconds']:.1f}s)")
    print("  ".join(parts), file=sys.stderr, flush=True)


def cmd_list(args: argparse.Namespace) -> int:
    from trials.listing import families, format_family

    for family in families():
        if args.family in (None, family):
            print(format_family(family))
    if args.family in (None, "sweep"):
        print(_format_sweep_settings())
    return 0


def _format_sweep_settings() -> str:
    """The sweep-wide settings of a spec (sampler:, resources:, failure:) with defaults and ranges."""
    from bdlab.spec import FailurePolicy, SamplerSettings, StudyDesign, TrialResources
    from trials.listing import format_params
    from trials.params import describe

    lines = ["sweep settings (spec keys):"]
    for key, cls in (
        ("sampler", SamplerSettings),
        ("resources.attack", TrialResources),
        ("resources.defense", TrialResources),
        ("failure", FailurePolicy),
        ('defenses[].study (a study cell, docs/spec.md "Studies")', StudyDesign),
    ):
        lines.append(f"  {key}")
        lines.extend(format_params(describe(cls)))
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from trials.run import evaluate_attacked, load_attacked

    loaded = load_attacked(args.attacked, args.device, args.weights)
    print(json.dumps(evaluate_attacked(loaded), indent=2))
    return 0


def _float_list(text: str | None, field: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    from trials.errors import InvalidValue

    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidValue(field, text, "comma-separated numbers, one per channel") from None
    if not values:
        raise InvalidValue(field, text, "comma-separated numbers, one per channel")
    return values


def cmd_import_checkpoint(args: argparse.Namespace) -> int:
    from trials.files import import_checkpoint, save_weights

    tensors = import_checkpoint(
        args.checkpoint,
        _float_list(args.input_mean, "--input-mean"),
        _float_list(args.input_std, "--input-std"),
    )
    save_weights(tensors, args.out)
    print(f"wrote {len(tensors)} tensors to {args.out}")
    return 0


def quiet_sweep_output() -> None:
    """The sweep prints its own progress lines: MLflow's URLs and progress bars, Ray Tune's tables
    and Optuna's per-trial logs are turned off (in this process; workers get bdlab.worker.worker_env)."""
    import os

    import optuna

    from bdlab.tracking.mlflow_tracker import QUIET_MLFLOW_ENV

    for key, value in {**QUIET_MLFLOW_ENV, "RAY_AIR_NEW_OUTPUT": "0"}.items():
        os.environ.setdefault(key, value)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def cmd_sweep(args: argparse.Namespace) -> int:
    from bdlab.spec import load_sweep
    from bdlab.sweep import run_sweep

    quiet_sweep_output()
    spec = load_sweep(args.spec)  # every name and value checked before anything starts
    run_sweep(
        spec,
        results=args.results,
        tracking_uri=args.tracking_uri,
        optuna_url=args.optuna_storage,
        address=args.address,
        fresh=args.fresh,
        checkpoints=args.checkpoints,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bdlab.report import export
    from bdlab.tracking import Store

    store = Store.open(args.results, args.tracking_uri, args.optuna_storage)
    out = export(store.tracker(), args.sweep, args.out)
    print(f"wrote {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bdlab.reporting import report_sweep
    from bdlab.tracking import Store
    from trials.errors import InvalidValue

    if args.num_classes is not None and args.num_classes < 2:
        raise InvalidValue("--num-classes", args.num_classes, "an integer >= 2")
    quiet_sweep_output()  # no MLflow download progress bars
    store = Store.open(args.results, args.tracking_uri, args.optuna_storage)
    paths = report_sweep(store.tracker(), args.sweep, args.out, args.num_classes)
    print(f"wrote {', '.join(str(p) for p in paths)} (also logged under report/ on the sweep's parent run)")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from bdlab.servers import serve_ui
    from bdlab.tracking import Store

    serve_ui(Store.open(args.results), port=args.port)
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from bdlab.cluster import ClusterFileError, check_cluster_file, new_secrets

    if args.cluster_command == "secrets":
        print(new_secrets(), end="")
        return 0
    try:
        config = check_cluster_file(args.file)
    except ClusterFileError as err:
        for line in str(err).splitlines():
            print(f"bdlab: error: {line}", file=sys.stderr)
        return 2
    provider = config.get("provider", {}).get("type")
    print(f"{args.file}: a valid cluster file ({provider} provider, Ray's schema and the platform's rules)")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from bdlab import service
    from trials.errors import InvalidValue

    if args.server_command == "start":
        if not 1 <= args.workers <= 16:
            raise InvalidValue("--workers", args.workers, "an integer from 1 to 16")
        state = service.start(args.root, args.host, args.port, args.postgres_url, args.workers, args.pg_user)
        running = True
    elif args.server_command == "user":
        service.add_user(args.root, args.name, args.role, exist_ok=args.exist_ok)
        print(f"added {args.role} {args.name} to the tracking service under {args.root}")
        return 0
    elif args.server_command == "stop":
        was = service.stop(args.root, args.pg_user)
        print(
            f"stopped the tracking service under {args.root}"
            if was
            else f"nothing was running under {args.root}"
        )
        return 0
    else:
        state, running = service.status(args.root)
        if args.exports:  # for `eval "$(bdlab server status --root DIR --exports)"` before a sweep
            print(f"export MLFLOW_TRACKING_URI={state.tracking_uri}")
            print(f'export BDLAB_OPTUNA_STORAGE="{state.optuna_url()}"')
            return 0 if running else 1
    print(f"tracking service under {args.root}: {'running' if running else 'stopped'}")
    print(f"  MLFLOW_TRACKING_URI={state.tracking_uri}  (log in with MLFLOW_TRACKING_USERNAME/PASSWORD)")
    print(f"  --optuna-storage {state.optuna_url()}")
    print(f"  PostgreSQL {state.postgres} ({'its own' if state.managed_postgres else 'external'})")
    return 0 if running else 1


COMMANDS = {
    "attack": cmd_attack,
    "defend": cmd_defend,
    "evaluate": cmd_evaluate,
    "import-checkpoint": cmd_import_checkpoint,
    "list": cmd_list,
    "sweep": cmd_sweep,
    "export": cmd_export,
    "report": cmd_report,
    "ui": cmd_ui,
    "cluster": cmd_cluster,
    "server": cmd_server,
}

if __name__ == "__main__":
    sys.exit(main())
