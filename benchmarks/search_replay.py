"""Replay a searcher against the recorded trial table: Optuna ask/tell on a nearest-neighbour
lookup, the sweep's own MO-ASHA and staged-evaluation code on the recorded curves and seconds.

How a searcher runs here (and why it is fair):

- **Lookup.** Optuna asks for a configuration through the search space's own define-by-run
  function; it is answered with the recorded trial nearest to it: categorical keys
  (method, augmentation) must match exactly, numeric keys are compared after scaling each to
  [0, 1] over its range (log-scaled for log-uniform keys), Euclidean distance. The answer is
  always a real recorded measurement, never a model's prediction, so no searcher is helped by
  a surrogate's errors, and every searcher sees the same table.
- **Draws** are once per run by default (``draw="once"``): each ask gets the nearest recorded
  configuration not yet drawn in this run. In a real sweep no two trials share a continuous
  configuration and each is a new noisy measurement, so a searcher that concentrates on a good
  region gets new neighbours there, not the same number again; with replacement
  (``draw="replace"``) the table is a deterministic piecewise-constant function, and a second
  ask in a cell returns a copy that adds nothing, which penalises exactly the concentration a
  model-based sampler exists for. The record reports both.
- **Time.** Trials run on ``workers`` parallel slots (2, like the embedded default on 2 cores);
  a slot that frees asks the sampler at once, with the running trials still pending (TPE's
  constant liar sees them). A trial costs, in order: the per-trial fixed cost (Ray start-up and
  tear-down, data/teacher/student set-up: the table's medians, the same for every trial since
  they do not depend on the configuration), its recorded epochs, then its recorded evaluation
  parts. Compute = slot-seconds; every slot is busy until the budget, so compute = workers x wall.
- **MO-ASHA** (afm_ray.search.mo_asha.RungLadder, the code the Tune scheduler runs) sees each
  recorded epoch's (val/clean_acc, val/pgd_acc) at the moment the replayed epoch ends; a
  stopped trial pays only its epochs so far and is told to Optuna as PRUNED.
- **Staged evaluation** (afm_ray.search.staged_aa.aa_verdict, the code the workers run) decides
  after PGD-20 against the trials finished by then; a skipped trial saves its recorded
  AutoAttack seconds and is told as PRUNED; it never enters the front.

A searcher's front at compute c is the non-dominated set of (clean_acc, aa_acc) over its trials
completed (with AutoAttack) by c.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import pandas as pd

from afm_ray.domination import hypervolume, non_dominated
from afm_ray.names import DEFAULT_OBJECTIVES, PER_EPOCH_METRICS
from afm_ray.search.mo_asha import RungLadder
from afm_ray.search.samplers import build_sampler
from afm_ray.search.space import SearchSpace, parse_search_space
from afm_ray.search.staged_aa import aa_verdict

OBJECTIVES = DEFAULT_OBJECTIVES
CURVE_COLUMNS = {"val/clean_acc": "val_clean_acc", "val/pgd10_acc": "val_pgd_acc"}


@dataclass(frozen=True)
class Searcher:
    """What is compared: a sampler (the space's `sampler:` mapping), optionally MO-ASHA
    (`scheduler:` mapping) and the evaluation policy."""

    label: str
    sampler: Mapping[str, Any]
    scheduler: Mapping[str, Any] | None = None
    aa_policy: str = "all"
    aa_margin: float = 0.01
    build: Callable[[int, int], Any] | None = (
        None  # (seed, num_samples) -> sampler, for samplers outside the space schema
    )


@dataclass
class TrialLog:
    row: int
    started: float
    ended: float
    state: str  # complete | stopped | aa_skipped
    epochs: int
    seconds: float
    aa_skip_reason: str = ""


@dataclass
class RunLog:
    """One searcher run: every trial, in order of completion."""

    trials: list[TrialLog] = field(default_factory=list)
    workers: int = 2

    def completions(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(compute at completion, objective rows) of trials that completed with AutoAttack."""
        done = [t for t in self.trials if t.state == "complete"]
        return np.array([self.workers * t.ended for t in done]), values[[t.row for t in done]]


class Table:
    """The recorded trials, indexed for nearest-neighbour lookup."""

    def __init__(self, frame: pd.DataFrame, space_yaml: str, *, fixed_cost_s: float | None = None):
        import yaml

        raw = yaml.safe_load(space_yaml)
        raw["sampler"] = {"name": "random"}
        self.space: SearchSpace = parse_search_space(raw)
        self.frame = frame.reset_index(drop=True)
        self.values = self.frame[[o.metric for o in OBJECTIVES]].to_numpy(dtype=float)
        self.modes = [o.mode for o in OBJECTIVES]
        # Worst recorded value of each objective: every recorded trial lies inside the box.
        self.reference = self.values.min(axis=0)
        self.true_front = non_dominated(self.values, self.modes)
        self.true_hv = hypervolume(self.values, self.modes, self.reference)
        overhead = np.clip(self.frame["wall_s"] - self.frame["worker_s"], 0, None)
        # Medians: a trial's start-up and set-up do not depend on its configuration, and a few
        # recorded trials spent minutes queued or were resumed; the median is robust to both.
        self.overhead_s = float(np.median(overhead))
        self.setup_s = float(np.median(self.frame["setup_s"]))
        self.fixed_cost_s = self.overhead_s + self.setup_s if fixed_cost_s is None else float(fixed_cost_s)
        self.epoch_s = [np.asarray(v, dtype=float) for v in self.frame["epoch_s"]]
        self.curves = {m: [np.asarray(v, dtype=float) for v in self.frame[c]] for m, c in CURVE_COLUMNS.items()}
        attacks = ("clean", "pgd20", "cw")
        self.pre_aa_s = self.frame[[f"eval_{a}_s" for a in attacks]].sum(axis=1).to_numpy()
        self.aa_s = self.frame["eval_aa_s"].to_numpy()
        # What the final evaluation spends besides the attacks (parameter count, latency).
        self.eval_rest_s = np.clip(self.frame["eval_s"].to_numpy() - self.pre_aa_s - self.aa_s, 0, None)
        self.full_cost_s = (
            self.fixed_cost_s + np.array([e.sum() for e in self.epoch_s]) + self.frame["eval_s"].to_numpy()
        )
        self._index()

    def _index(self) -> None:
        self.categorical: list[str] = []
        self.numeric: list[tuple[str, float, float, bool]] = []  # key, low, high, log
        for dist in self.space.search:
            if dist.kind == "choice":
                self.categorical.append(dist.key)
            else:
                log = dist.kind == "loguniform"
                self.numeric.append((dist.key, dist.low, dist.high, log))
        self.cat_codes = self.frame[[f"param:{k}" for k in self.categorical]].astype(str).to_numpy()
        self.num_scaled = np.stack(
            [self._scale(self.frame[f"param:{k}"].to_numpy(float), *rest) for k, *rest in self.numeric], axis=1
        )

    @staticmethod
    def _scale(x: np.ndarray, low: float, high: float, log: bool) -> np.ndarray:
        if log:
            return (np.log(x) - math.log(low)) / (math.log(high) - math.log(low))
        return (x - low) / (high - low)

    def nearest(self, params: Mapping[str, Any], used: set[int] | None = None) -> int:
        """Row of the recorded configuration nearest to ``params`` (see the module docstring),
        among the rows not in ``used`` (all rows once every row is used)."""
        cats = np.array([str(params.get(k)) for k in self.categorical])
        mismatch = (self.cat_codes != cats).sum(axis=1)
        query = np.array(
            [self._scale(np.array(float(params[k])), *rest) if k in params else np.nan for k, *rest in self.numeric]
        )
        # A key absent on both sides (a conditional key that does not apply) adds nothing; absent
        # on one side only cannot happen once the categorical keys it depends on match.
        diff = np.where(np.isnan(query)[None, :] & np.isnan(self.num_scaled), 0.0, self.num_scaled - query[None, :])
        dist = np.nansum(diff**2, axis=1) + np.where(np.isnan(diff), 1.0, 0.0).sum(axis=1)
        if used and len(used) < len(dist):
            dist[list(used)] = np.inf
            mismatch = np.where(np.isinf(dist), len(self.categorical) + 1, mismatch)
        # Categorical keys first (lexicographic): a different method is never "near".
        return int(np.lexsort((dist, mismatch))[0])


def make_sampler(table: Table, searcher: Searcher, seed: int, num_samples: int) -> Any:
    if searcher.build is not None:
        return searcher.build(seed, num_samples)
    raw_sampler = dict(searcher.sampler)
    from afm_ray.search.specs import parse_sampler  # the sweep's own defaults and validation

    return build_sampler(parse_sampler(raw_sampler, num_samples, "benchmark"), seed)


def replay(
    table: Table,
    searcher: Searcher,
    *,
    seed: int,
    budget_s: float,
    num_samples: int,
    workers: int = 2,
    draw: str = "once",
) -> RunLog:
    """Run ``searcher`` until ``budget_s`` slot-seconds are used; trials started before then finish.

    ``draw``: "once" maps each ask to the nearest recorded configuration not yet drawn in this
    run; "replace" to the nearest of all (see the module docstring)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        directions=["maximize" if o.mode == "max" else "minimize" for o in OBJECTIVES],
        sampler=make_sampler(table, searcher, seed, num_samples),
    )
    define = table.space.define_by_run()
    epochs = len(table.epoch_s[0])
    ladder = None
    if searcher.scheduler:
        s = searcher.scheduler
        ladder = RungLadder(
            ["max"] * len(PER_EPOCH_METRICS),
            grace_period=int(s.get("grace_period", 1)),
            reduction_factor=float(s.get("reduction_factor", 3)),
            max_t=epochs,
        )
    log = RunLog(workers=workers)
    finished: list[tuple[str, dict[str, float]]] = []  # completed with AutoAttack: the staged policy's evidence
    events: list[tuple[float, int, Any]] = []
    counter = 0
    used: set[int] = set()

    def launch(now: float) -> None:
        nonlocal counter
        trial = study.ask()
        define(trial)
        row = table.nearest(trial.params, used if draw == "once" else None)
        used.add(row)
        counter += 1
        state = {"trial": trial, "row": row, "key": f"t{counter}", "started": now, "epoch": 0, "phase": "epochs"}
        heapq.heappush(events, (now + table.fixed_cost_s, counter, state))

    def end(state: dict, now: float, kind: str, reason: str = "") -> None:
        row = state["row"]
        if kind == "complete":
            study.tell(state["trial"], [float(v) for v in table.values[row]])
            finished.append((state["key"], dict(zip([o.metric for o in OBJECTIVES], table.values[row], strict=True))))
            finished[-1][1]["pgd20_acc"] = float(table.frame.at[row, "pgd20_acc"])
        else:
            study.tell(state["trial"], state=optuna.trial.TrialState.PRUNED)
        log.trials.append(TrialLog(row, state["started"], now, kind, state["epoch"], now - state["started"], reason))

    for _ in range(workers):
        launch(0.0)
    while events:
        now, _, state = heapq.heappop(events)
        row = state["row"]
        if state["phase"] == "epochs":
            if state["epoch"] > 0 and ladder is not None:
                e = state["epoch"]
                values = [table.curves[m][row][e - 1] for m in PER_EPOCH_METRICS]
                if not ladder.on_result(state["key"], e, values):
                    end(state, now, "stopped")
                    if workers * now < budget_s:
                        launch(now)
                    continue
            if state["epoch"] < epochs:
                state["epoch"] += 1
                heapq.heappush(events, (now + table.epoch_s[row][state["epoch"] - 1], state_id(state), state))
                continue
            state["phase"] = "pre_aa"
            heapq.heappush(events, (now + table.pre_aa_s[row], state_id(state), state))
            continue
        if state["phase"] == "pre_aa":
            reason = None
            if searcher.aa_policy == "candidates":
                metrics = {
                    "clean_acc": float(table.values[row][0]),
                    "pgd20_acc": float(table.frame.at[row, "pgd20_acc"]),
                }
                reason = aa_verdict(metrics, finished, OBJECTIVES, searcher.aa_margin)
            state["phase"] = "done"
            state["reason"] = reason
            extra = table.eval_rest_s[row] + (0.0 if reason else table.aa_s[row])
            heapq.heappush(events, (now + extra, state_id(state), state))
            continue
        reason = state.get("reason")
        end(state, now, "aa_skipped" if reason else "complete", reason or "")
        if workers * now < budget_s:
            launch(now)
    return log


def state_id(state: dict) -> int:
    return int(state["key"][1:])


def hv_curve(table: Table, log: RunLog, grid: np.ndarray) -> np.ndarray:
    """Hypervolume of the front found by each compute value in ``grid``."""
    at, values = log.completions(table.values)
    order = np.argsort(at)
    at, values = at[order], values[order]
    out = np.zeros(len(grid))
    for i, c in enumerate(grid):
        k = int(np.searchsorted(at, c, side="right"))
        out[i] = hypervolume(values[:k], table.modes, table.reference) if k else 0.0
    return out


def skipped_on_front(table: Table, log: RunLog) -> int:
    """Trials whose AutoAttack was skipped but whose recorded (clean, aa) would have been on the
    front of that run's trials (the policy's claim is that this never happens)."""
    rows = [t.row for t in log.trials if t.state in ("complete", "aa_skipped")]
    skipped = {t.row for t in log.trials if t.state == "aa_skipped"}
    if not skipped:
        return 0
    front = {rows[i] for i in non_dominated(table.values[rows], table.modes)}
    complete = {t.row for t in log.trials if t.state == "complete"}
    return len((front & skipped) - complete)


def quartiles(x: Sequence[float]) -> tuple[float, float, float]:
    q = np.percentile(np.asarray(x, dtype=float), [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])
