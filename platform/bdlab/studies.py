"""Phase 2's search: one Optuna study per (attacked model, defense) cell, all driven by one Ray Tune
searcher, so every cell's trials share one scheduler, one resource pool and one failure policy.

Why a searcher of our own rather than `OptunaSearch`: Tune takes one searcher per run, and
OptunaSearch drives one study. `CellSearcher` keeps one persistent study per cell
(Optuna's ask/tell interface, with Tune as the executor) and decides which cell the next free
slot serves, round-robin, so the studies progress together and each sampler sees its cell's
results as they come in.

The studies are the sweep's memory (nothing is read back from Tune's own experiment state, which is
a pickle): a re-run opens them again; COMPLETE and FAIL trials are kept, trials left RUNNING by a
killed driver are run again under their own number (resuming from their checkpoint), and only the
remaining budget is asked for.

A study cell (a defense entry with `study:`, bdlab.designs) is driven the same way: its budget is
its points, and its k-th trial is point k, enqueued with its configuration's values (so Optuna
records them as the trial's params) and its design attributes; a re-run asks only the points it has
not asked yet.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from bdlab.spaces import ChoiceDist, encode, suggest
from bdlab.spec import DefenseCell, SweepSpec
from trials.device import derive_seed

DEFAULT_ATTR = "bdlab.default"  # user attribute: the cell's default configuration
PARAMS_ATTR = "bdlab.params"  # user attribute: the full parameter overrides the trial ran with
POINT_ATTR = "bdlab.point"  # user attribute of a study trial: its design point (JSON, see Pending.point)
DIRECTION = {"max": "maximize", "min": "minimize"}


def study_name(sweep: str, generation: int, cell: DefenseCell) -> str:
    return f"{sweep}:g{generation}:{cell.attack.label}:{cell.defense.name}"


def make_sampler(spec: SweepSpec, name: str) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded per study (same spec and cell: same suggestions)."""
    seed = derive_seed(spec.sampler.seed, "sampler", name) % 2**31
    kind = spec.sampler.name
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


class PatientStorage(optuna.storages.RDBStorage):
    """Optuna's storage on a database server (PostgreSQL): pooled connections are checked before
    use, and a call made while the server restarts is retried for up to `patience_s` (each storage
    call is one transaction, so a retried call is applied once)."""

    patience_s = 120.0


def _patient(method: Any) -> Any:
    import time

    import sqlalchemy.exc

    transient = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError)

    @functools.wraps(method)
    def call(self: PatientStorage, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + self.patience_s
        while True:
            try:
                return method(self, *args, **kwargs)
            except transient:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    return call


for _name in optuna.storages.BaseStorage.__abstractmethods__:
    setattr(PatientStorage, _name, _patient(getattr(optuna.storages.RDBStorage, _name)))


@functools.cache
def optuna_storage(url: str) -> str | optuna.storages.BaseStorage:
    """SQLite (one process, on the driver's disk) as its URL; a database server patiently, through
    one connection pool for every cell's study."""
    if url.startswith("sqlite"):
        return url
    return PatientStorage(url, engine_kwargs={"pool_pre_ping": True})


def open_study(spec: SweepSpec, storage: str, name: str) -> optuna.Study:
    return optuna.create_study(
        study_name=name,
        storage=optuna_storage(storage),
        directions=[DIRECTION[mode] for mode in spec.objectives.values()],
        sampler=make_sampler(spec, name),
        load_if_exists=True,
    )


def default_in_space(cell: DefenseCell) -> dict[str, Any]:
    """The default configuration's values of the searched parameters, in Optuna's form, where the
    space can hold them (a value outside a choice list cannot be recorded as that parameter)."""
    from trials.params import as_dict
    from trials.run import DefenseSpec, resolve_defense

    resolved = as_dict(resolve_defense(DefenseSpec(cell.defense.name, cell.defense.default_params())).params)
    space = cell.defense.space
    representable = {
        name: resolved[name]
        for name, dist in space.items()
        if name in resolved and (not isinstance(dist, ChoiceDist) or dist.contains(resolved[name]))
    }
    return encode(space, representable)


@dataclass
class Pending:
    """A trial to (re)run: its cell, its Optuna number and the parameters it runs with."""

    cell: int
    number: int
    params: dict[str, Any]
    default: bool
    resumed: bool = False  # left RUNNING by an earlier driver
    # a study trial's design point: design, configuration, defense_seed, data_fraction, data_subset
    point: dict[str, Any] | None = None


@dataclass
class CellState:
    cell: DefenseCell
    study: optuna.Study
    budget: int
    asked: int = 0  # trials of this cell in the study (any state)
    resume: list[Pending] = field(default_factory=list)  # left RUNNING by an earlier driver
    points: list[Any] = field(default_factory=list)  # a study cell's design points (bdlab.designs)


class CellSearcher(Searcher):
    """Hands Tune one defense trial at a time, round-robin over cells with budget left."""

    def __init__(
        self,
        spec: SweepSpec,
        cells: list[DefenseCell],
        studies: list[optuna.Study],
        trial_config: Any,  # (cell index, Pending) -> the trial's config
    ) -> None:
        super().__init__(metric=None, mode=None)
        self.spec = spec
        self.states: list[CellState] = []
        for i, (cell, study) in enumerate(zip(cells, studies, strict=True)):
            state = CellState(cell, study, cell.defense.trials)
            if cell.defense.study is not None:
                from bdlab.designs import study_points

                state.points = study_points(
                    cell.defense.space, cell.defense.study, spec.sampler.seed, cell.label
                )
                state.budget = len(state.points)
            for t in study.get_trials(deepcopy=False):
                state.asked += 1
                if t.state == TrialState.RUNNING:
                    state.resume.append(
                        Pending(
                            i,
                            t.number,
                            json.loads(t.user_attrs[PARAMS_ATTR]),
                            bool(t.user_attrs.get(DEFAULT_ATTR)),
                            resumed=True,
                            point=json.loads(t.user_attrs[POINT_ATTR]) if POINT_ATTR in t.user_attrs else None,
                        )
                    )
            self.states.append(state)
        self.trial_config = trial_config
        self.live: dict[str, tuple[int, int]] = {}  # Tune trial id -> (cell, Optuna number)
        self._next = 0

    # -- how much is left ------------------------------------------------------------------------
    def remaining(self) -> int:
        return sum(len(s.resume) + max(0, s.budget - s.asked) for s in self.states)

    def _pick(self) -> int | None:
        n = len(self.states)
        for k in range(n):
            i = (self._next + k) % n
            s = self.states[i]
            if s.resume or s.asked < s.budget:
                self._next = i + 1
                return i
        return None

    # -- Searcher API ----------------------------------------------------------------------------
    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the objectives come from the sweep spec, not from TuneConfig

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        i = self._pick()
        if i is None:
            return Searcher.FINISHED
        s = self.states[i]
        pending = s.resume.pop(0) if s.resume else self._ask(i)
        self.live[trial_id] = (i, pending.number)
        return self.trial_config(i, pending)

    def _ask(self, i: int) -> Pending:
        s = self.states[i]
        if s.points:
            return self._ask_point(i)
        cell = s.cell
        first = s.asked == 0  # the defender's configuration (paper defaults or the named preset)
        if first:
            enqueued = default_in_space(cell)
            s.study.enqueue_trial(enqueued, user_attrs={DEFAULT_ATTR: True})
            trial = s.study.ask()
            # record the default's own values of the searched parameters (nothing is sampled)
            suggest(trial, {k: v for k, v in cell.defense.space.items() if k in enqueued})
            params = cell.defense.default_params()
        else:
            trial = s.study.ask()
            params = {**cell.defense.default_params(), **suggest(trial, cell.defense.space)}
        trial.set_user_attr(PARAMS_ATTR, json.dumps(params, sort_keys=True))
        s.asked += 1
        return Pending(i, trial.number, params, first)

    def _ask_point(self, i: int) -> Pending:
        """The next design point of a study cell, as an enqueued (not sampled) trial."""
        s = self.states[i]
        cell = s.cell
        p = s.points[s.asked]
        default = p.values is None
        point = {
            "design": cell.defense.study.design,
            "configuration": p.configuration,
            "defense_seed": p.seed,
            "data_fraction": p.budget,
            "data_subset": p.subset,
        }
        values = default_in_space(cell) if default else encode(cell.defense.space, p.values)
        attrs = {POINT_ATTR: json.dumps(point, sort_keys=True), **({DEFAULT_ATTR: True} if default else {})}
        s.study.enqueue_trial(values, user_attrs=attrs)
        trial = s.study.ask()
        recorded = suggest(trial, {k: v for k, v in cell.defense.space.items() if k in values})
        params = cell.defense.default_params() if default else {**cell.defense.default_params(), **recorded}
        if p.budget is not None:
            params["data_fraction"] = p.budget
            if params.get("data_count") is not None:
                params["data_count"] = None  # the budget is a fraction; a count would override it
        trial.set_user_attr(PARAMS_ATTR, json.dumps(params, sort_keys=True))
        s.asked += 1
        return Pending(i, trial.number, params, default, point=point)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.live:
            return
        i, number = self.live.pop(trial_id)
        s = self.states[i]
        values = None
        if not error and result and result.get("done"):
            values = [result.get(f"val_{m}") for m in self.spec.objectives]
            if any(v is None or not math.isfinite(v) for v in values):
                values = None
        if values is None:
            s.study.tell(number, state=TrialState.FAIL)
        else:
            s.study.tell(number, values)

    def save(self, checkpoint_path: str) -> None:
        # the state lives in the Optuna storage; Tune's snapshot only needs a marker
        with open(checkpoint_path, "w") as fh:
            json.dump({"state": "in the Optuna studies"}, fh)

    def restore(self, checkpoint_path: str) -> None:  # never used: a re-run rebuilds from the studies
        pass
