"""Attacked models, content-addressed in the tracking store: train each one once, reuse it anywhere.

An attacked model's key is a hash of its cell (dataset, model, attack, parameters, seed: the explicit
JSON description the caller supplies) and of the code that trains it (`code_version`). All attacked
models live in one experiment, `bdlab/attacked-models`, so every sweep finds every model; a run there
holds the model folder written by `trials.run.save_attack_result` as its artifact folder `attacked`.

Two sweeps (or two trials of one sweep) that need the same model race through `claim_attacked`, which
lets exactly one of them train it (`bdlab.claims` has the protocol; a run with the key that FINISHED
ends the race for everyone). A waiter polls until a run with the key finishes (reuse it) or no live
claim is left (the winner FAILED, was killed, or went silent): it claims again.

The winner's caller trains, uploads the folder (`log_attacked`), sends heartbeats while it works
(`claims.keep_alive` does it from a thread), and ends the run with `tracking.finish_run` (FINISHED
or FAILED).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bdlab.claims import claim_tags, claims, contend, withdraw
from bdlab.tracking import Tracker, schema
from trials.errors import BdlabError, InvalidValue

log = logging.getLogger(__name__)

# The source files whose content defines an attacked model (globs relative to the repository root).
CODE_VERSION_FILES = (
    "trials/data/**/*.py",
    "trials/models/**/*.py",
    "trials/attacks/**/*.py",
    "trials/training.py",
    "trials/run/attack.py",
    "trials/run/folder.py",
    "trials/metrics.py",
)
ATTACKED_ARTIFACT = "attacked"  # the run's artifact folder holding the attacked-model folder
LISTED = ("RUNNING", "FINISHED")  # a FINISHED run with the key ends every claim on it


class ClaimTimeout(BdlabError):
    """Waited longer than `wait_s` for another process to finish training an attacked model."""


# --- keys --------------------------------------------------------------------------------------------


def _source_root() -> Path:
    """The folder holding the `trials` package (found without importing it: that imports torch)."""
    spec = importlib.util.find_spec("trials")
    if spec is None or not spec.submodule_search_locations:
        raise BdlabError("the `trials` package cannot be found; is bdlab installed?")
    return Path(next(iter(spec.submodule_search_locations))).resolve().parent


def code_files(patterns: Iterable[str] = CODE_VERSION_FILES, root: Path | None = None) -> list[Path]:
    """The files matched by `patterns` under `root`, as sorted relative paths (no bytecode caches)."""
    root = root or _source_root()
    found = {
        p.relative_to(root)
        for pattern in patterns
        for p in root.glob(pattern)
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    return sorted(found, key=lambda p: p.as_posix())


def code_version(patterns: Iterable[str] | None = None, root: Path | None = None) -> str:
    """sha256 over the relative paths and bytes of the files that define an attacked model, hex[:16].
    The default (no arguments) is computed once per process."""
    if patterns is None and root is None:
        return _default_code_version()
    return _hash_files(tuple(patterns or CODE_VERSION_FILES), root or _source_root())


@functools.cache
def _default_code_version() -> str:
    return _hash_files(CODE_VERSION_FILES, _source_root())


def _hash_files(patterns: tuple[str, ...], root: Path) -> str:
    files = code_files(patterns, root)
    if not files:
        raise BdlabError(f"code version: no file matches {list(patterns)} under {str(root)!r}")
    digest = hashlib.sha256()
    for rel in files:
        digest.update(rel.as_posix().encode() + b"\0")
        digest.update(hashlib.sha256((root / rel).read_bytes()).digest())
    return digest.hexdigest()[:16]


def cache_key(identity: Mapping[str, Any], device_kind: str | None = None) -> str:
    """The attacked model's key: sha256 of the canonical JSON of {"cell": identity, "code":
    code_version()} (plus "device" when `device_kind` is given, for results that are not portable
    across device kinds), hex[:20]."""
    payload: dict[str, Any] = {"cell": identity, "code": code_version()}
    if device_kind is not None:
        payload["device"] = device_kind
    try:
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InvalidValue("cache identity", identity, f"it must be plain JSON data ({err})") from None
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# --- finding and claiming --------------------------------------------------------------------------


def find_attacked(tracker: Tracker, key: str) -> str | None:
    """The run id of a FINISHED attack run with this key (the oldest, if several), or None."""
    experiment = tracker.experiment_id(schema.ATTACK_EXPERIMENT, schema.experiment_tags())
    runs = tracker.find_runs([experiment], {schema.CACHE_KEY: key}, ("FINISHED",))
    return runs[-1].run_id if runs else None


def claim_attacked(
    tracker: Tracker,
    key: str,
    label: str,
    tags: Mapping[str, Any],
    wait_s: float = 3600,
    poll_s: float = 2.0,
    stale_s: float = 600.0,
) -> tuple[str, bool]:
    """(run id, True) when this caller must train the attacked model `key` into the returned run;
    (run id of the finished model, False) when it exists or another process trained it meanwhile.
    Raises ClaimTimeout after `wait_s` seconds of waiting for another process."""
    experiment = tracker.experiment_id(schema.ATTACK_EXPERIMENT, schema.experiment_tags())
    deadline = time.monotonic() + wait_s
    while True:
        found = find_attacked(tracker, key)
        if found:
            return found, False
        match = {schema.CACHE_KEY: key}
        me = tracker.create_run(
            experiment, label, tags={schema.KIND: "attack", **tags, **match, **claim_tags()}
        )
        try:
            outcome, winner, _ = contend(tracker, experiment, match, me, poll_s, stale_s, LISTED)
        except BaseException:
            withdraw(tracker, me)
            raise
        if outcome == "won":
            return me, True
        if winner is not None:  # a finished model appeared meanwhile
            return winner, False
        finished = _wait_for_claims(tracker, key, deadline, poll_s, stale_s)
        if finished is not None:
            return finished, False
        time.sleep(random.uniform(0, poll_s))  # the winner failed or vanished: retry, out of step


def _wait_for_claims(
    tracker: Tracker, key: str, deadline: float, poll_s: float, stale_s: float
) -> str | None:
    """Poll until a run with `key` finishes (its id) or no live claim is left (None)."""
    experiment = tracker.experiment_id(schema.ATTACK_EXPERIMENT, schema.experiment_tags())
    while True:
        finished, live = claims(tracker, experiment, {schema.CACHE_KEY: key}, stale_s, statuses=LISTED)
        if finished:
            return finished
        if not live:
            return None
        if time.monotonic() > deadline:
            raise ClaimTimeout(
                f"attacked model {key}: still being trained by run {live[0].run_id} "
                f"in {tracker.uri}; waited longer than wait_s"
            )
        time.sleep(poll_s)


# --- moving attacked-model folders -----------------------------------------------------------------


def log_attacked(tracker: Tracker, run_id: str, folder: str | Path) -> None:
    """Upload an attacked-model folder (from `trials.run.save_attack_result`) into the claim's run."""
    tracker.log_folder(run_id, folder, ATTACKED_ARTIFACT)
    tracker.set_tags(run_id, {schema.CODE_VERSION: code_version()})


def fetch_attacked(tracker: Tracker, run_id: str, dest_root: str | Path) -> Path:
    """The run's attacked-model folder, downloaded once into dest_root/<key>/ (atomically: into a
    temporary folder, then renamed) and reused afterwards. Loadable by `trials.run.load_attacked`."""
    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    key = tracker.get_run(run_id).tags.get(schema.CACHE_KEY) or run_id
    target = dest_root / key
    if _complete(target):
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=dest_root))
    try:
        folder = tracker.download_folder(run_id, ATTACKED_ARTIFACT, tmp)
        if not _complete(folder):
            raise BdlabError(
                f"attacked model {key}: run {run_id} holds no complete {ATTACKED_ARTIFACT!r} folder "
                f"in {tracker.uri}"
            )
        if target.exists() and not _complete(target):  # a leftover that is not ours to trust
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(folder, target)
        except OSError:
            if not _complete(target):  # not a concurrent download that got there first
                raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _complete(folder: Path) -> bool:
    from trials.run import ATTACKED_FILES

    return folder.is_dir() and all((folder / f).is_file() for f in ATTACKED_FILES)
