"""Claims: let exactly one of several processes do a piece of work, through the tracking API alone.

Workers and drivers may run on different nodes with no shared file system, so a claim is an MLflow
run. The work is named by a set of tags (`match`); every process that wants it:

1. creates a claim run (RUNNING) with those tags, a unique claim id, its host and pid, and a
   heartbeat, then lists the RUNNING runs with the same tags (one snapshot);
2. no other live claim is listed: it won. Safe, because any claim created after ours lists ours;
3. other live claims are listed: they are ordered by (start_time, run_id). Every claimant that is not
   the first withdraws (deletes its run) at once. The first waits (briefly) until the others have
   withdrawn and then wins; if one stays, that one listed no rival (it won at step 2), so the first
   withdraws too. Withdrawing never makes two winners, so clock skew between nodes can only cost a
   retry, never the work done twice.

A claim is dead, and is ended as KILLED by whoever lists it, when it sent no heartbeat for `stale_s`
seconds, or when it names this host and a process that no longer runs here (a driver killed with
SIGKILL is replaced at once on its own machine, after `stale_s` from another).

Users: `bdlab.cache` (an attacked model is trained once; a FINISHED run with its key ends the race)
and `driver_lease` (one driver per sweep at a time).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from bdlab.tracking import KIND_TAG, SWEEP_TAG, Store, _tag_values, find_runs, finish_run, set_tags
from trials.errors import BdlabError

log = logging.getLogger(__name__)

CLAIM_TAG = "bdlab.claim"
HEARTBEAT_TAG = "bdlab.heartbeat"
HOST_TAG = "bdlab.host"
PID_TAG = "bdlab.pid"
DRIVER_EXPERIMENT = "bdlab/drivers"


class SweepBusy(BdlabError):
    """Another driver holds the sweep."""


def claim_tags() -> dict[str, str]:
    """The tags that make a run a claim: a unique id, a first heartbeat, and who holds it."""
    return {
        CLAIM_TAG: uuid.uuid4().hex,
        HEARTBEAT_TAG: f"{time.time():.0f}",
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
    }


def heartbeat(store: Store, run_id: str) -> None:
    """Tell the other claimants that the holder of a claim is still at work."""
    set_tags(store, run_id, {HEARTBEAT_TAG: f"{time.time():.0f}"})


@contextlib.contextmanager
def keep_alive(store: Store, run_id: str, every_s: float = 60.0) -> Iterator[None]:
    """Send `heartbeat`s from a background thread while the body runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                heartbeat(store, run_id)
            except Exception as err:  # noqa: BLE001 - a lost heartbeat must not kill the work
                log.warning("heartbeat of run %s failed: %s", run_id, err)

    thread = threading.Thread(target=beat, name=f"bdlab-heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def silent_for(run: Any, now: float | None = None) -> float:
    """Seconds since the claim's last heartbeat (or its start, without one); heartbeats are whole
    seconds, so a fresh one can lie up to half a second ahead: never below 0."""
    beat = run.data.tags.get(HEARTBEAT_TAG)
    last = float(beat) if beat else run.info.start_time / 1000
    return max(0.0, (now or time.time()) - last)


def _gone(run: Any) -> bool:
    """The claim names this host and a process that no longer runs here."""
    tags = run.data.tags
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return False
    try:
        os.kill(int(tags[PID_TAG]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, owned by someone else
        return False
    return False


def claims(
    store: Store,
    experiment_id: str,
    match: Mapping[str, str],
    stale_s: float,
    keep: str | None = None,
    statuses: tuple[str, ...] = ("RUNNING",),
) -> tuple[str | None, list]:
    """(the oldest FINISHED run id or None, the live RUNNING claims, oldest first) among the runs
    tagged `match`. Dead claims other than `keep` are ended as KILLED on the way."""
    runs = find_runs(store, [experiment_id], match, statuses)[::-1]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if finished:
        return finished[0].info.run_id, []
    live = []
    now = time.time()
    for run in runs:
        reason = None
        if run.info.run_id != keep:
            if _gone(run):
                reason = "its process is gone"
            elif (silent := silent_for(run, now)) > stale_s:
                reason = f"no heartbeat for {silent:.0f} s"
        if reason:
            log.warning("%s: claim %s ended (%s)", dict(match), run.info.run_id, reason)
            with contextlib.suppress(Exception):
                finish_run(store, run.info.run_id, "KILLED", {"bdlab.stale": reason})
            continue
        live.append(run)
    return None, live


def contend(
    store: Store,
    experiment_id: str,
    match: Mapping[str, str],
    me: str,
    poll_s: float,
    stale_s: float,
    statuses: tuple[str, ...] = ("RUNNING",),
) -> tuple[str, str | None, list]:
    """Steps 2-3 for our claim run `me`: ("won", None, []), or ("lost", finished run id or None,
    the live rivals) after withdrawing `me`."""
    confirm_until = time.monotonic() + max(10.0, 5 * poll_s)
    while True:
        finished, live = claims(store, experiment_id, match, stale_s, keep=me, statuses=statuses)
        rivals = [r for r in live if r.info.run_id != me]
        if finished:
            withdraw(store, me)
            return "lost", finished, rivals
        if len(rivals) == len(live):  # our claim was ended by someone else
            withdraw(store, me)
            return "lost", None, rivals
        if not rivals:
            return "won", None, []
        first = min(live, key=lambda r: (r.info.start_time, r.info.run_id))
        if first.info.run_id != me or time.monotonic() > confirm_until:
            withdraw(store, me)
            return "lost", None, rivals
        time.sleep(min(poll_s, 0.25))  # we are first: wait for the others to withdraw


def withdraw(store: Store, run_id: str) -> None:
    """Delete a claim run (so it is no candidate and counts as nothing)."""
    client = store.client()
    try:
        client.delete_run(run_id)
    except Exception:  # noqa: BLE001 - best effort: at least end it
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "KILLED")


@contextlib.contextmanager
def driver_lease(store: Store, sweep: str, stale_s: float = 120.0, beat_s: float = 30.0) -> Iterator[str]:
    """Hold the sweep `sweep` for this driver while the body runs (yields the lease's run id).

    Two drivers on one sweep would both take over its RUNNING trials and run them twice; the second
    one raises SweepBusy instead, naming the holder. A driver killed without releasing its lease is
    replaced at once on its own host and after `stale_s` seconds of silence from any other."""
    experiment = store.experiment_id(DRIVER_EXPERIMENT)
    match = {KIND_TAG: "driver", SWEEP_TAG: sweep}
    run = store.client().create_run(
        experiment, tags=_tag_values({**match, **claim_tags()}), run_name=f"driver of {sweep}"
    )
    me = run.info.run_id
    try:
        outcome, _, rivals = contend(store, experiment, match, me, poll_s=0.5, stale_s=stale_s)
    except BaseException:
        withdraw(store, me)
        raise
    if outcome == "lost":
        holder = rivals[0] if rivals else None
        who = (
            f"host {holder.data.tags.get(HOST_TAG, '?')}, pid {holder.data.tags.get(PID_TAG, '?')}, "
            f"last heartbeat {silent_for(holder):.0f} s ago"
            if holder is not None
            else "a driver that started at the same moment"
        )
        raise SweepBusy(
            f"sweep {sweep}: another driver is running it ({who}) in {store.tracking_uri}; wait for it "
            f"to end or stop it (a driver silent for {stale_s:.0f} s is replaced)"
        )
    try:
        with keep_alive(store, me, beat_s):
            yield me
    finally:
        withdraw(store, me)
