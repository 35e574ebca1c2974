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

from bdlab.tracking import RunRecord, Tracker, schema
from trials.errors import BdlabError

log = logging.getLogger(__name__)

class SweepBusy(BdlabError):
    """Another driver holds the sweep."""


def claim_tags() -> dict[str, str]:
    """The tags that make a run a claim: a unique id, a first heartbeat, and who holds it."""
    return {
        schema.CLAIM: uuid.uuid4().hex,
        schema.HEARTBEAT: f"{time.time():.0f}",
        schema.HOST: socket.gethostname(),
        schema.PID: str(os.getpid()),
    }


def heartbeat(tracker: Tracker, run_id: str) -> None:
    """Tell the other claimants that the holder of a claim is still at work."""
    tracker.set_tags(run_id, {schema.HEARTBEAT: f"{time.time():.0f}"})


@contextlib.contextmanager
def keep_alive(tracker: Tracker, run_id: str, every_s: float = 60.0) -> Iterator[None]:
    """Send `heartbeat`s from a background thread while the body runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                heartbeat(tracker, run_id)
            except Exception as err:  # noqa: BLE001 - a lost heartbeat must not kill the work
                log.warning("heartbeat of run %s failed: %s", run_id, err)

    thread = threading.Thread(target=beat, name=f"bdlab-heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def silent_for(run: RunRecord, now: float | None = None) -> float:
    """Seconds since the claim's last heartbeat (or its start, without one); heartbeats are whole
    seconds, so a fresh one can lie up to half a second ahead: never below 0."""
    beat = run.tags.get(schema.HEARTBEAT)
    last = float(beat) if beat else run.start_time / 1000
    return max(0.0, (now or time.time()) - last)


def _gone(run: RunRecord) -> bool:
    """The claim names this host and a process that no longer runs here."""
    tags = run.tags
    if tags.get(schema.HOST) != socket.gethostname() or not tags.get(schema.PID, "").isdigit():
        return False
    try:
        os.kill(int(tags[schema.PID]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, owned by someone else
        return False
    return False


def claims(
    tracker: Tracker,
    experiment_id: str,
    match: Mapping[str, str],
    stale_s: float,
    keep: str | None = None,
    statuses: tuple[str, ...] = ("RUNNING",),
) -> tuple[str | None, list[RunRecord]]:
    """(the oldest FINISHED run id or None, the live RUNNING claims, oldest first) among the runs
    tagged `match`. Dead claims other than `keep` are ended as KILLED on the way."""
    runs = tracker.find_runs([experiment_id], match, statuses)[::-1]
    finished = [r for r in runs if r.status == "FINISHED"]
    if finished:
        return finished[0].run_id, []
    live = []
    now = time.time()
    for run in runs:
        reason = None
        if run.run_id != keep:
            if _gone(run):
                reason = "its process is gone"
            elif (silent := silent_for(run, now)) > stale_s:
                reason = f"no heartbeat for {silent:.0f} s"
        if reason:
            log.warning("%s: claim %s ended (%s)", dict(match), run.run_id, reason)
            with contextlib.suppress(Exception):
                tracker.finish_run(run.run_id, "KILLED", {schema.STALE: reason})
            continue
        live.append(run)
    return None, live


def contend(
    tracker: Tracker,
    experiment_id: str,
    match: Mapping[str, str],
    me: str,
    poll_s: float,
    stale_s: float,
    statuses: tuple[str, ...] = ("RUNNING",),
) -> tuple[str, str | None, list[RunRecord]]:
    """Steps 2-3 for our claim run `me`: ("won", None, []), or ("lost", finished run id or None,
    the live rivals) after withdrawing `me`."""
    confirm_until = time.monotonic() + max(10.0, 5 * poll_s)
    while True:
        finished, live = claims(tracker, experiment_id, match, stale_s, keep=me, statuses=statuses)
        rivals = [r for r in live if r.run_id != me]
        if finished:
            withdraw(tracker, me)
            return "lost", finished, rivals
        if len(rivals) == len(live):  # our claim was ended by someone else
            withdraw(tracker, me)
            return "lost", None, rivals
        if not rivals:
            return "won", None, []
        first = min(live, key=lambda r: (r.start_time, r.run_id))
        if first.run_id != me or time.monotonic() > confirm_until:
            withdraw(tracker, me)
            return "lost", None, rivals
        time.sleep(min(poll_s, 0.25))  # we are first: wait for the others to withdraw


def withdraw(tracker: Tracker, run_id: str) -> None:
    """Delete a claim run (so it is no candidate and counts as nothing)."""
    try:
        tracker.delete_run(run_id)
    except Exception:  # noqa: BLE001 - best effort: at least end it
        with contextlib.suppress(Exception):
            tracker.set_status(run_id, "KILLED")


@contextlib.contextmanager
def driver_lease(tracker: Tracker, sweep: str, stale_s: float = 120.0, beat_s: float = 30.0) -> Iterator[str]:
    """Hold the sweep `sweep` for this driver while the body runs (yields the lease's run id).

    Two drivers on one sweep would both take over its RUNNING trials and run them twice; the second
    one raises SweepBusy instead, naming the holder. A driver killed without releasing its lease is
    replaced at once on its own host and after `stale_s` seconds of silence from any other."""
    experiment = tracker.experiment_id(schema.DRIVER_EXPERIMENT, schema.experiment_tags())
    match = {schema.KIND: "driver", schema.SWEEP: sweep}
    me = tracker.create_run(experiment, f"driver of {sweep}", tags={**match, **claim_tags()})
    try:
        outcome, _, rivals = contend(tracker, experiment, match, me, poll_s=0.5, stale_s=stale_s)
    except BaseException:
        withdraw(tracker, me)
        raise
    if outcome == "lost":
        holder = rivals[0] if rivals else None
        who = (
            f"host {holder.tags.get(schema.HOST, '?')}, pid {holder.tags.get(schema.PID, '?')}, "
            f"last heartbeat {silent_for(holder):.0f} s ago"
            if holder is not None
            else "a driver that started at the same moment"
        )
        raise SweepBusy(
            f"sweep {sweep}: another driver is running it ({who}) in {tracker.uri}; wait for it "
            f"to end or stop it (a driver silent for {stale_s:.0f} s is replaced)"
        )
    try:
        with keep_alive(tracker, me, beat_s):
            yield me
    finally:
        withdraw(tracker, me)
