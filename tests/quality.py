"""The quality problems of the test suite in one place, and the script that measures their spread.

A quality test asserts that a method really works: an attack implants, a defense erases. On the
digits problems these outcomes are decided by a few dozen images, so one seed's result sits close
to where it flips, and PyTorch's CPU kernels round differently from one processor to another
(`ATEN_CPU_CAPABILITY`: default, avx2, avx512): a single seed that passes on one machine fails on
another. So a claim that lies near its bound is asserted for a majority of `SEEDS` (attack seed =
defense seed; `majority`), with margins set from the spread that this script prints, and a claim far
from its bound on every seed and both capabilities measured runs once:

    python tests/quality.py [--seeds 0 1 2] [--only aft nc ...] [--json spread.json]
    ATEN_CPU_CAPABILITY=default python tests/quality.py ...   # another machine's rounding

The cases below are what the tests run (they import this module, and run them through `Runs`, a
pool of one worker process per core); the script runs the same cases, one after the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEEDS = (0, 1, 2)
BADNETS = {"size": 3, "target": 0, "ratio": 0.1}  # the defenses' problem: BadNets 3x3, target 0, 10 %
# (target, attack seed = defense seed) of the BadNets models a detecting defense must tell apart: the
# defenses' model and two with other targets (NC's flag, issue 12 item 5)
TARGETS = ((0, 0), (3, 1), (7, 2))


# --- attacks ---------------------------------------------------------------------------------------


def badnets_spec(seed: int, clean_reference: bool = False, target: int = 0):
    """BadNets on digits with mini_resnet and the digits recipe; with `clean_reference`, also a clean
    model of the same recipe (trained after the attacked one, which does not depend on it)."""
    from trials.run import AttackSpec

    params = {**BADNETS, "target": target}
    return AttackSpec(attack_params=params, seed=seed, device="cpu", clean_reference=clean_reference)


def train_badnets(seed: int, folder: Path, clean_reference: bool = False, target: int = 0):
    """The attacked model of `seed` (and `target`), saved as an attacked-model folder and loaded back."""
    from trials.run import load_attacked, run_attack, save_attack_result

    result = run_attack(badnets_spec(seed, clean_reference, target))
    return load_attacked(save_attack_result(result, folder), "cpu")


# attack name -> parameters of the cases that must implant with the digits recipe (README, "Attacks
# on digits"): sig and label_consistent do not on these easy images, WaNet's default sub-pixel warp
# does not either, but a visible one (s = 4, about 2 px) does.
ATTACK_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "blended": ("blended", {}),
    "trojannn": ("trojannn", {}),
    "wanet_s4": ("wanet", {"s": 4.0}),  # noise mode on (the default): bimodal at 30 epochs (README)
    "wanet_s4_no_noise": ("wanet", {"s": 4.0, "noise": False}),
}


def attack_metrics(case: str, seed: int) -> dict[str, Any]:
    from trials.run import AttackSpec, run_attack

    attack, params = ATTACK_CASES[case]
    return run_attack(AttackSpec(attack=attack, attack_params=params, seed=seed, device="cpu")).metrics


# --- defenses on BadNets ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DefenseCase:
    defense: str
    overrides: dict[str, Any] = field(default_factory=dict)  # on top of the defense's cpu preset
    note: str = ""


DEFENSE_CASES: dict[str, DefenseCase] = {
    "identity": DefenseCase("identity", {}, "no defense: the claims' power (each fails on it)"),
    "bcu": DefenseCase("bcu"),
    "bcu_code_lr": DefenseCase(
        "bcu",
        {"ratio_stem": 0.01, "ratio_layer1": 0.01, "ratio_layer2": 0.03, "ratio_layer3": 0.09,
         "ratio_layer4": 0.27, "ratio_head": 0.1, "lr": 0.01},  # fmt: skip
        "the run script's ratios and lr: the backdoor is restored at this scale",
    ),
    "clp_u3": DefenseCase("clp", {"u": 3.0}),
    "aft": DefenseCase("aft"),
    "aft_code_values": DefenseCase("aft", {"adversarial_epochs": 3}, "the earlier cpu preset (README)"),
    "aft_per_sample": DefenseCase("aft", {"augmentation": "per_sample"}, "per-image augmentation coins"),
    "pbe": DefenseCase("pbe"),
    "pbe_per_sample": DefenseCase(
        "pbe", {"augmentation": "per_sample"}, "per-image augmentation coins, shuffled pool (preset file)"
    ),
    "nc": DefenseCase("nc"),
    "nc_unlearn": DefenseCase(
        "nc", {"unlearn_when_undetected": True}, "unlearns with the smallest mask even below the threshold"
    ),
    "ft_lr5x": DefenseCase("ft", {"lr": 0.05, "epochs": 3, "milestones": []}),
    "fp_prune_only": DefenseCase("fp", {"epochs": 0}),
    "gdm_short": DefenseCase(
        "gdm", {"target": 0, "betas": [0.9], "search_epochs": 3, "epochs": 5, "milestones": [3, 4]}
    ),
    "gdm_nothing_stamped": DefenseCase(
        "gdm",
        {"target": 0, "betas": [0.9], "search_epochs": 1, "epochs": 5, "milestones": [3, 4], "poison_ratio": 0.0},
        "control: the same retraining with no image stamped is plain fine-tuning",
    ),
    "ibau": DefenseCase("ibau"),
    "ibau_lr_3e-4": DefenseCase("ibau", {"lr": 3e-4}, "the earlier cpu preset (README)"),
    "nad_short": DefenseCase("nad", {"teacher_epochs": 2, "epochs": 3, "milestones": []}),
    "nad_plain": DefenseCase(
        "nad",
        {"teacher_epochs": 0, "epochs": 3, "milestones": [], "betas": [0, 0, 0, 0]},
        "control: NAD without its attention loss is plain fine-tuning",
    ),
}


def defend(attacked, case: str | DefenseCase, seed: int, **overrides: Any):
    """Run a case (its defense's cpu preset + the case's overrides + `overrides`) with `seed`."""
    from trials.presets import load_preset
    from trials.run import DefenseSpec, run_defense

    c = DEFENSE_CASES[case] if isinstance(case, str) else case
    params = {**load_preset(c.defense, "cpu"), **c.overrides, **overrides}
    return run_defense(DefenseSpec(c.defense, params, preset="cpu", seed=seed), attacked)


# --- the claims ------------------------------------------------------------------------------------


def acc_drop(m: dict[str, Any]) -> float:
    return m["before"]["acc"] - m["acc"]


def erased(m: dict[str, Any], max_asr: float, max_acc_drop: float) -> bool:
    """ASR at most `max_asr` on both test halves, clean accuracy down by at most `max_acc_drop`."""
    return m["asr"] <= max_asr and m["val"]["asr"] <= max_asr and acc_drop(m) <= max_acc_drop


# case -> (max ASR, max ACC drop) each defense test asserts: the bars of the issues that introduced
# them (ASR <= 10 % within 3 points for the erasers; < 20 % for the baselines), loosened only where
# the spread measured here says a bar sits inside the method's own variation (see each test).
ERASURES: dict[str, tuple[float, float]] = {
    "bcu": (0.10, 0.03),
    "pbe": (0.10, 0.03),
    "aft": (0.10, 0.04),
    "nc_unlearn": (0.20, 0.06),
    "ft_lr5x": (0.20, 0.20),
    "gdm_short": (0.20, 0.06),
    "ibau": (0.20, 0.06),
    "nad_short": (0.30, 0.10),
}


def erases(case: str) -> Callable[[dict[str, Any]], bool]:
    max_asr, max_drop = ERASURES[case]
    return lambda m: erased(m, max_asr, max_drop)


def kept(m: dict[str, Any], min_asr: float = 0.5) -> bool:
    """The backdoor survives (a control: the variant without the method's key step)."""
    return m["asr"] >= min_asr


# --- running the cases: each once per session, two at a time -------------------------------------
# The suite is single-threaded (one torch thread: tests/conftest.py), so a second core sits idle.
# Quality runs go to a pool of worker processes, one per core: a majority's first two seeds, or a
# module's runs submitted up front, run side by side. Each run is deterministic in its own process
# (seeded at its start), so the pool changes when a result arrives, never what it is.


def _worker_init() -> None:
    import os

    import torch

    torch.set_num_threads(1)
    # The runs train while the session's other tests run (tests/conftest.py starts them first): those
    # tests keep the CPU's priority, Ray's trial workers included, which Ray runs at niceness 15.
    os.nice(19)


def _train_badnets(seed: int, folder: str, target: int = 0) -> str:
    train_badnets(seed, Path(folder), clean_reference=seed == 0 and target == 0, target=target)
    return folder


def _attack_run(case: str, seed: int) -> dict[str, Any]:
    return {"metrics": attack_metrics(case, seed)}


def _defense_run(folder: str, case: str, seed: int) -> dict[str, Any]:
    from trials.run import load_attacked

    result = defend(load_attacked(folder, "cpu"), case, seed)
    pairs = list(result.model.conv_bn_pairs())
    pruned = sum(int(((bn.weight == 0) & (bn.bias == 0)).sum()) for _, bn in pairs)
    channels = sum(len(bn.weight) for _, bn in pairs)
    return {
        "metrics": result.metrics,
        "spec": result.spec,
        "state": result.model.state_dict(),  # the defended weights
        "zeroed_bn_channels": (pruned, channels),
    }


class Runs:
    """The quality runs of a test session, in a pool of `workers` processes; each (case, seed) runs
    once, and its result is kept. Attacked models are folders under `root` (BadNets at a seed,
    seed 0 with its clean reference model). A defense run is handed to the pool once its attacked
    model is trained (a waiting thread holds it meanwhile), so asking for it never blocks."""

    def __init__(self, root: Path, workers: int = 2) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

        self.root = root
        self.pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
        )
        self._waiting = ThreadPoolExecutor(64, thread_name_prefix="quality-run")
        self._futures: dict[tuple[str, ...], Any] = {}

    def close(self) -> None:
        self._waiting.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(cancel_futures=True)

    def _submit(self, key: tuple[str, ...], fn: Callable[..., Any], *args: Any, after: Any = None) -> Any:
        """The run's future, submitted once; with `after` (an attacked model's future), `fn` gets its
        folder as first argument and goes to the pool when it is trained."""
        if key not in self._futures:
            if after is None:
                self._futures[key] = self.pool.submit(fn, *args)
            else:
                run_after = lambda: self.pool.submit(fn, after.result(), *args).result()  # noqa: E731
                self._futures[key] = self._waiting.submit(run_after)
        return self._futures[key]

    def _badnets(self, seed: int, target: int = 0) -> Any:
        if target == 0:  # the defenses' model
            return self._submit(
                ("badnets", str(seed)), _train_badnets, seed, str(self.root / f"badnets-{seed}")
            )
        folder = str(self.root / f"badnets-{seed}-target-{target}")
        return self._submit(("badnets", str(seed), str(target)), _train_badnets, seed, folder, target)

    def attacked(self, seed: int) -> Any:
        """The attacked model of `seed`, loaded in this process (ASR checked)."""
        from trials.run import load_attacked

        if seed in (0, 1):
            self._badnets(0), self._badnets(1)  # both are needed by the majorities: train them together
        attacked = load_attacked(self._badnets(seed).result(), "cpu")
        assert attacked.metrics["asr"] >= 0.95, attacked.metrics
        return attacked

    def submit(self, case: str, seed: int, target: int = 0) -> Any:
        """Start a run (an attack case, or a defense case on BadNets at `seed` with `target`); returns
        its future."""
        if case in ATTACK_CASES:
            return self._submit((case, str(seed)), _attack_run, case, seed)
        key = (case, str(seed)) if target == 0 else (case, str(seed), str(target))
        return self._submit(key, _defense_run, case, seed, after=self._badnets(seed, target))

    def prefetch(self, runs: Sequence[tuple[Any, ...]]) -> None:
        """Submit runs that the coming tests need, (case, seed) or (case, seed, target), so that both
        cores stay busy: the attacked models of seeds 0 and 1 first (every module needs them), then
        the attack cases, then the defense runs (each starts once its attacked model is trained)."""
        for seed in sorted({0, 1, *(run[1] for run in runs if run[0] not in ATTACK_CASES)}):
            self._badnets(seed)
        for run in sorted(runs, key=lambda run: run[0] not in ATTACK_CASES):
            self.submit(*run)

    def run(self, case: str, seed: int = 0, target: int = 0) -> dict[str, Any]:
        """The run's result: {"metrics"} (attacks), with "spec", "state" (the defended weights) and
        "zeroed_bn_channels" (pruned, total) for defenses."""
        return self.submit(case, seed, target).result()

    def metrics(self, case: str, seed: int = 0) -> dict[str, Any]:
        return self.run(case, seed)["metrics"]

    def majority(
        self, case: str, claim: Callable[[dict[str, Any]], bool], seeds: Sequence[int] = SEEDS
    ) -> tuple[bool, list[dict[str, Any]]]:
        """Whether `claim` holds for a majority of the seeds' runs, and what each run gave. The
        first two seeds run side by side; the third only when they disagree (two agreeing runs of
        three decide), so a claim that holds costs two runs, not three."""
        need = len(seeds) // 2 + 1
        for seed in seeds[:need]:
            self.submit(case, seed)
        votes = {True: 0, False: 0}
        seen: list[dict[str, Any]] = []
        for seed in seeds:
            m = self.metrics(case, seed)
            holds = bool(claim(m))
            seen.append({"seed": seed, "holds": holds, **summary(m)})
            votes[holds] += 1
            if votes[holds] >= need:
                return holds, seen
        return votes[True] >= need, seen


# --- the spread script -----------------------------------------------------------------------------


def summary(m: dict[str, Any]) -> dict[str, Any]:
    out = {k: m[k] for k in ("acc", "asr") if k in m}
    out["val_asr"] = m["val"]["asr"]
    if "before" in m:
        out["acc_before"] = m["before"]["acc"]
        out["asr_before"] = m["before"]["asr"]
    if "clean_reference" in m:
        out["clean_acc"] = m["clean_reference"]["acc"]
        out["clean_asr"] = m["clean_reference"]["asr"]
    for key in ("flagged", "anomaly_index", "mask_l1", "pruned_channels", "channels", "target"):
        if key in m.get("findings", {}):
            out[key] = m["findings"][key]
    out["seconds"] = m["seconds"]
    return out


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument(
        "--only", nargs="+", help="case names (attacks, 'badnets', defense cases and 'nc_targets')"
    )
    parser.add_argument("--json", type=Path, help="write every run's summary here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the test suite (tests/conftest.py)
    wanted: Callable[[str], bool] = lambda name: args.only is None or name in args.only  # noqa: E731
    capability = torch.backends.cpu.get_cpu_capability()
    rows: list[dict[str, Any]] = []

    def record(case: str, seed: int, metrics: dict[str, Any]) -> None:
        row = {"case": case, "seed": seed, "capability": capability, **summary(metrics)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for case in ATTACK_CASES:
                if wanted(case):
                    record(case, seed, attack_metrics(case, seed))
            defenses = [c for c in DEFENSE_CASES if wanted(c)]
            if not (defenses or wanted("badnets")):
                continue
            started = time.perf_counter()
            attacked = train_badnets(seed, Path(tmp) / f"badnets-{seed}", clean_reference=True)
            record("badnets", seed, {**attacked.metrics, "seconds": round(time.perf_counter() - started, 1)})
            for case in defenses:
                record(case, seed, defend(attacked, case, seed).metrics)
        # NC on the models with other targets (their seeds are fixed by TARGETS, not --seeds)
        for target, seed in TARGETS if wanted("nc_targets") else ():
            attacked = train_badnets(seed, Path(tmp) / f"badnets-{seed}-target-{target}", target=target)
            record(f"nc_target_{target}", seed, defend(attacked, "nc", seed).metrics)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
