"""The sweep's terminal output: one line per trial event with the phase's counts, not Ray's table."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback


def clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class PhaseProgress(Callback):
    """Counts a phase's trials (done / running / failed / pending) and prints them on every change.

    `describe(trial)` names a trial in the output; `best(trial, result)` may return a line to print
    when a trial brings a new best point for its cell. It also sums the seconds trials ran
    (`trial_seconds`, retried attempts included), for the phase's busy fraction.
    """

    def __init__(
        self,
        phase: str,
        total: int,
        describe: Callable[[Any], str],
        best: Callable[[Any, dict], str | None] | None = None,
        out: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.phase, self.total = phase, total
        self.describe, self.best = describe, best
        self.out = out or (lambda line: print(line, file=sys.stdout, flush=True))
        self.clock = clock
        self.started = clock()
        self.running: set[str] = set()
        self.done = self.failed = 0
        self.last: dict[str, dict] = {}
        self.began: dict[str, float] = {}
        self.trial_seconds = 0.0

    def _ran(self, trial: Any) -> None:
        began = self.began.pop(trial.trial_id, None)
        if began is not None:
            self.trial_seconds += self.clock() - began

    def busy_fraction(self, cpus_per_trial: float, cpus: float) -> float:
        """The share of the phase's CPU capacity that trials held: the sum of trial seconds times
        the CPUs each reserves, over the phase's wall time times the cluster's CPUs."""
        wall = self.clock() - self.started
        return self.trial_seconds * cpus_per_trial / (wall * cpus) if wall > 0 and cpus > 0 else 0.0

    def _line(self, event: str) -> None:
        pending = max(0, self.total - self.done - self.failed - len(self.running))
        self.out(
            f"[{self.phase} {clock(time.monotonic() - self.started)}] done {self.done}/{self.total}, "
            f"running {len(self.running)}, failed {self.failed}, pending {pending} | {event}"
        )

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running.add(trial.trial_id)
        self.began[trial.trial_id] = self.clock()
        self._line(f"started {self.describe(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.last[trial.trial_id] = result

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.running.discard(trial.trial_id)
        self._ran(trial)
        self.done += 1
        result = self.last.pop(trial.trial_id, {}) or trial.last_result or {}
        self._line(f"finished {self.describe(trial)}{_scores(result)}")
        if self.best is not None:
            line = self.best(trial, result)
            if line:
                self.out(f"    best so far: {line}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._ran(trial)  # the failed attempt's seconds count; the retry's clock starts now
        self.began[trial.trial_id] = self.clock()
        self._line(f"retrying {self.describe(trial)} after an error")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.running.discard(trial.trial_id)
        self._ran(trial)
        self.failed += 1
        self.last.pop(trial.trial_id, None)
        self._line(f"FAILED {self.describe(trial)}")


def _scores(result: dict) -> str:
    if "val_acc" not in result:
        return ""
    asr = result.get("val_asr")
    return f": val ACC {result['val_acc']:.3f}" + (f" ASR {asr:.3f}" if asr is not None else "")
