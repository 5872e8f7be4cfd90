"""Replay a searcher against a recorded trial table: each configuration it asks for is answered
with a recorded trial, the sweep's own MO-ASHA and staged-evaluation code run on the recorded
curves and seconds.

How a searcher runs here (and why it is fair):

- **Lookup.** An Optuna sampler asks for a configuration through the search space's own
  define-by-run function; it is answered with the recorded trial nearest to it: categorical keys
  (method, augmentation) matched first, then numeric keys compared after scaling each to [0, 1]
  over its range (log-scaled for log-uniform keys), Euclidean distance. The sampler is then told
  the parameters of the row actually measured, never the ones it asked for: the asked trial is
  retracted (told as FAIL, which every Optuna sampler ignores) and the row's own parameters are
  run as an enqueued trial, which inherits the asked trial's sampler bookkeeping (NSGA-II's
  generation). An ask answered from another categorical cell (its cell used up) is counted.
- **Draws** (``draw``): ``once`` hands each recorded trial out at most once per run, with its
  recorded result (a finite pool: a sampler that keeps asking for one cell gets that cell's
  rows one by one, however far they are from what it asked). ``surrogate`` answers every ask
  at the parameters asked, with a new measurement around the table's smoother there
  (benchmarks/search_denoise.py): a training-seed draw (the learned seed-to-seed variance), then a
  binomial draw on the table's number of test images. Nothing is used up and nothing repeats,
  so a focused sampler cannot enumerate a pool of lucky draws. The per-epoch curves and seconds
  are the nearest recorded row's (its cell always has rows), the curves shifted by the
  smoother's difference between the asked point and that row.
- **Baselines** without Optuna: ``uniform_rows`` draws a row uniformly (each row equally likely,
  whatever the geometry of the space; under ``surrogate`` a uniform point of the space);
  ``cell_greedy`` draws ``startup`` of those, then always from the categorical cell whose
  completed trials have the best mean single-point hypervolume so far (reference: the worst
  value observed so far of each objective).
- **Time.** Trials run on ``workers`` parallel slots; a slot that frees asks at once, with the
  running trials still pending (TPE's constant liar sees them). A trial costs: the per-trial
  fixed cost (the table's medians of Ray start-up/tear-down and set-up), its recorded epochs,
  then its recorded evaluation parts. Compute = slot-seconds.
- **MO-ASHA** (afm_ray.search.mo_asha.RungLadder, the code the Tune scheduler runs) sees each
  recorded epoch's (val/clean_acc, val/pgd10_acc) when the replayed epoch ends; a stopped trial
  pays only its epochs so far and is told to the sampler as PRUNED.
- **Staged evaluation** (afm_ray.search.staged_aa.aa_verdict, the code the workers run) decides
  after PGD-20 against the trials finished by then (their observed values); a skipped trial
  saves its AutoAttack seconds, is told as PRUNED and never enters the front.
- **Score.** A searcher's front at compute c: the configurations it completed (with
  AutoAttack) by c, scored at their denoised values (the smoother's mean), so a lucky draw is
  worth what its configuration is worth on average. Regret = ``Table.best_hv(draw)`` (the
  hypervolume of the denoised values of all rows; under ``surrogate`` also of a dense uniform
  sample of the space) minus that.
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
POLICIES = ("optuna", "uniform_rows", "cell_greedy")
DRAWS = ("once", "surrogate")
DENSE_SAMPLE = 20_000  # points of the space whose surrogate values bound the best front (draw="surrogate")


@dataclass(frozen=True)
class Searcher:
    """What is compared: a proposal policy (an Optuna sampler given as the space's `sampler:`
    mapping, or a baseline), optionally MO-ASHA (`scheduler:` mapping) and the evaluation policy."""

    label: str
    sampler: Mapping[str, Any] | None = None
    policy: str = "optuna"  # optuna | uniform_rows | cell_greedy
    startup: int = 10  # cell_greedy: uniform draws before it focuses
    scheduler: Mapping[str, Any] | None = None
    aa_policy: str = "all"
    aa_margin: float = 0.01
    build: Callable[[int, int], Any] | None = None  # (seed, num_samples) -> a sampler outside the space schema


@dataclass
class TrialLog:
    row: int
    started: float
    ended: float
    state: str  # complete | stopped | aa_skipped
    epochs: int
    seconds: float
    observed: tuple[float, float] = (math.nan, math.nan)  # (clean, aa) measured, or that would have been
    score: tuple[float, float] = (math.nan, math.nan)  # the denoised (clean, aa) of the configuration
    cross_cell: bool = False  # asked for one categorical cell, answered from another
    aa_skip_reason: str = ""


@dataclass
class RunLog:
    """One searcher run: every trial, in order of completion."""

    trials: list[TrialLog] = field(default_factory=list)
    workers: int = 2

    def completions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(compute at completion, row, denoised values) of the trials that completed with AutoAttack."""
        done = [t for t in self.trials if t.state == "complete"]
        at = np.array([self.workers * t.ended for t in done])
        return at, np.array([t.row for t in done], dtype=int), np.array([t.score for t in done]).reshape(-1, 2)


class Table:
    """The recorded trials, indexed for nearest-neighbour lookup, with the values they are scored at.

    ``smoother`` (benchmarks/search_denoise.Smoother, fitted on this table): the denoised
    objectives, at the rows (the score) and anywhere (draw="surrogate"); None scores the recorded
    values and allows only draw="once" (a table without noise, e.g. a test's)."""

    def __init__(
        self, frame: pd.DataFrame, space_yaml: str, *, smoother: Any = None, fixed_cost_s: float | None = None
    ):
        import yaml

        raw = yaml.safe_load(space_yaml)
        raw["sampler"] = {"name": "random"}
        self.space: SearchSpace = parse_search_space(raw)
        self.space_yaml = space_yaml
        self.frame = frame.reset_index(drop=True)
        self.values = self.frame[[o.metric for o in OBJECTIVES]].to_numpy(dtype=float)
        self.smoother = smoother
        self.score = self.values.copy() if smoother is None else np.asarray(smoother.mean, dtype=float)
        self.noise_var = np.zeros(len(OBJECTIVES)) if smoother is None else np.asarray(smoother.noise_var, dtype=float)
        self.modes = [o.mode for o in OBJECTIVES]
        # Worst recorded value of each objective: every recorded (and denoised) trial lies inside the box.
        self.reference = np.minimum(self.values.min(axis=0), self.score.min(axis=0))
        self.true_front = non_dominated(self.score, self.modes)
        self.true_hv = hypervolume(self.score, self.modes, self.reference)
        self.recorded_front = non_dominated(self.values, self.modes)
        self.true_hv_recorded = hypervolume(self.values, self.modes, self.reference)
        overhead = np.clip(self.frame["wall_s"] - self.frame["worker_s"], 0, None)
        # Medians: a trial's start-up and set-up do not depend on its configuration, and a few
        # recorded trials spent minutes queued or were resumed; the median is robust to both.
        self.overhead_s = float(np.median(overhead))
        self.setup_s = float(np.median(self.frame["setup_s"]))
        self.fixed_cost_s = self.overhead_s + self.setup_s if fixed_cost_s is None else float(fixed_cost_s)
        self.epoch_s = [np.asarray(v, dtype=float) for v in self.frame["time/epoch_s"]]
        self.curves = {m: [np.asarray(v, dtype=float) for v in self.frame[m]] for m in PER_EPOCH_METRICS}
        attacks = ("clean", "pgd20", "cw")
        self.pre_aa_s = self.frame[[f"eval_{a}_s" for a in attacks]].sum(axis=1).to_numpy()
        self.aa_s = self.frame["eval_aa_s"].to_numpy()
        self.pgd_gap = self.frame["pgd20_acc"].to_numpy(float) - self.values[:, 1]
        self.n_samples = self.frame["n_samples"].to_numpy(float)
        self._best_hv: dict[str, float] = {"once": self.true_hv}
        # What the final evaluation spends besides the attacks (parameter count, latency).
        self.eval_rest_s = np.clip(self.frame["eval_s"].to_numpy() - self.pre_aa_s - self.aa_s, 0, None)
        self.full_cost_s = (
            self.fixed_cost_s + np.array([e.sum() for e in self.epoch_s]) + self.frame["eval_s"].to_numpy()
        )
        self._index()

    def _index(self) -> None:
        self.categorical: list[str] = []
        self.numeric: list[tuple[str, float, float, bool]] = []  # key, low, high, log
        self.kinds: dict[str, str] = {}
        for dist in self.space.search:
            self.kinds[dist.key] = dist.kind
            if dist.kind == "choice":
                self.categorical.append(dist.key)
            else:
                self.numeric.append((dist.key, dist.low, dist.high, dist.kind == "loguniform"))
        self.cat_codes = self.frame[[f"param:{k}" for k in self.categorical]].astype(str).to_numpy()
        cells = ["|".join(c) for c in self.cat_codes]
        self.cell_names = sorted(set(cells))
        self.cells = np.array([self.cell_names.index(c) for c in cells])
        self.num_scaled = np.stack(
            [self._scale(self.frame[f"param:{k}"].to_numpy(float), *rest) for k, *rest in self.numeric], axis=1
        )

    @staticmethod
    def _scale(x: np.ndarray, low: float, high: float, log: bool) -> np.ndarray:
        if log:
            return (np.log(x) - math.log(low)) / (math.log(high) - math.log(low))
        return (x - low) / (high - low)

    def cell_of(self, params: Mapping[str, Any]) -> str:
        return "|".join(str(params.get(k)) for k in self.categorical)

    def row_params(self, row: int) -> dict[str, Any]:
        """The searched parameters of a recorded row, typed as the space suggests them."""
        out: dict[str, Any] = {}
        for key, kind in self.kinds.items():
            value = self.frame.at[row, f"param:{key}"]
            if kind != "choice" and pd.isna(value):
                continue  # a conditional key that did not apply
            out[key] = value if kind == "choice" else int(value) if kind == "int" else float(value)
        return out

    def nearest(self, params: Mapping[str, Any], used: set[int] | None = None) -> int:
        """Row of the recorded configuration nearest to ``params`` (see the module docstring),
        among the rows not in ``used`` (all rows once every row is used)."""
        cats = np.array([str(params.get(k)) for k in self.categorical])
        mismatch = (self.cat_codes != cats).sum(axis=1)
        query = np.array(
            [self._scale(np.array(float(params[k])), *rest) if k in params else np.nan for k, *rest in self.numeric]
        )
        # A key absent on both sides (a conditional key that does not apply) adds nothing; absent
        # on one side only counts as the largest distance on that key.
        diff = np.where(np.isnan(query)[None, :] & np.isnan(self.num_scaled), 0.0, self.num_scaled - query[None, :])
        dist = np.nansum(diff**2, axis=1) + np.where(np.isnan(diff), 1.0, 0.0).sum(axis=1)
        if used and len(used) < len(dist):
            dist[list(used)] = np.inf
            mismatch = np.where(np.isinf(dist), len(self.categorical) + 1, mismatch)
        # Categorical keys first (lexicographic): a different method is never "near".
        return int(np.lexsort((dist, mismatch))[0])

    def denoised(self, params: Mapping[str, Any]) -> np.ndarray:
        """The smoother's (clean, aa) at a configuration."""
        from search_denoise import features_of

        return self.smoother.predict(features_of(dict(params), self.space))[0]

    def random_params(self, rng: np.random.Generator, cell: int | None = None) -> dict[str, Any]:
        """A uniform point of the space (its categorical keys those of ``cell`` if given)."""
        fixed = dict(zip(self.categorical, self.cell_names[cell].split("|"), strict=True)) if cell is not None else {}
        params: dict[str, Any] = {}
        for dist in self.space.search:
            if not dist.applies({**self.space.fixed, **params}):
                continue
            if dist.kind == "choice":
                choices = (
                    [c for c in dist.choices if str(c) == fixed[dist.key]] if dist.key in fixed else list(dist.choices)
                )
                params[dist.key] = choices[int(rng.integers(len(choices)))]
            elif dist.kind == "int":
                params[dist.key] = int(rng.integers(int(dist.low), int(dist.high) + 1))
            elif dist.kind == "loguniform":
                params[dist.key] = float(math.exp(rng.uniform(math.log(dist.low), math.log(dist.high))))
            else:
                params[dist.key] = float(rng.uniform(dist.low, dist.high))
        return params

    def best_hv(self, draw: str) -> float:
        """The hypervolume a searcher's regret is measured from: the denoised front of the rows, and
        under "surrogate" also of the smoother's values at a dense uniform sample of the space."""
        if draw not in self._best_hv:
            from search_denoise import features

            rng = np.random.default_rng(0)
            sample = pd.DataFrame(
                [{f"param:{k}": v for k, v in self.random_params(rng).items()} for _ in range(DENSE_SAMPLE)]
            )
            for key in self.kinds:
                if f"param:{key}" not in sample:
                    sample[f"param:{key}"] = np.nan
            dense = self.smoother.predict(features(sample, self.space))
            points = np.vstack([self.score, dense])
            # hypervolume() compares every pair of points; only the non-dominated ones count.
            self._best_hv[draw] = hypervolume(points[_front_2d(points)], self.modes, self.reference)
        return self._best_hv[draw]


def _front_2d(points: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of two maximised objectives, in O(n log n)."""
    order = np.lexsort((-points[:, 1], -points[:, 0]))  # first objective descending, ties: second descending
    best = np.maximum.accumulate(points[order, 1])
    keep = np.r_[True, points[order[1:], 1] > best[:-1]]
    return order[keep]


def make_sampler(searcher: Searcher, seed: int, num_samples: int) -> Any:
    if searcher.build is not None:
        return searcher.build(seed, num_samples)
    from afm_ray.search.specs import parse_sampler  # the sweep's own defaults and validation

    return build_sampler(parse_sampler(dict(searcher.sampler or {}), num_samples, "benchmark"), seed)


class _Proposer:
    """Chooses the configuration of the next trial and hears how it ended.

    ``propose(available)`` -> (row, params, cross_cell, handle): under draw="once" ``row`` is the
    recorded trial that answers (one of ``available``) and ``params`` its parameters; under
    "surrogate" ``params`` is the configuration measured and ``row`` the nearest recorded trial
    of its cell, whose curves and seconds it borrows."""

    def __init__(self, table: Table, once: bool):
        self.table, self.once = table, once

    def propose(self, available: np.ndarray) -> tuple[int, dict[str, Any], bool, Any]:
        raise NotImplementedError

    def tell(self, handle: Any, row: int, observed: Sequence[float] | None) -> None:
        """``observed``: the (clean, aa) measured, or None if the trial was stopped or its AutoAttack skipped."""


class _OptunaProposer(_Proposer):
    def __init__(self, table: Table, searcher: Searcher, seed: int, num_samples: int, once: bool):
        super().__init__(table, once)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        self.study = optuna.create_study(
            directions=["maximize" if o.mode == "max" else "minimize" for o in OBJECTIVES],
            sampler=make_sampler(searcher, seed, num_samples),
        )
        self.define = table.space.define_by_run()

    def propose(self, available: np.ndarray) -> tuple[int, dict[str, Any], bool, Any]:
        asked = self.study.ask()
        self.define(asked)
        if not self.once:  # measured where asked
            return self.table.nearest(asked.params), dict(asked.params), False, asked
        row = self.table.nearest(asked.params, set(np.flatnonzero(~available).tolist()))
        params = self.table.row_params(row)
        cross_cell = self.table.cell_of(asked.params) != self.table.cell_of(params)
        # Retract the asked point (FAIL: no sampler learns from it) and run the measured row's own
        # parameters, so the sampler is told where the measurement was taken.
        bookkeeping = self.study._storage.get_trial(asked._trial_id).system_attrs
        self.study.tell(asked, state=optuna.trial.TrialState.FAIL)
        self.study.enqueue_trial(params)
        measured = self.study.ask()
        for key, value in bookkeeping.items():
            if key != "fixed_params":  # e.g. NSGA-II's generation, set while the asked trial sampled
                self.study._storage.set_trial_system_attr(measured._trial_id, key, value)
        self.define(measured)
        return row, params, cross_cell, measured

    def tell(self, handle: Any, row: int, observed: Sequence[float] | None) -> None:
        if observed is None:
            self.study.tell(handle, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(handle, [float(v) for v in observed])


class _UniformRows(_Proposer):
    def __init__(self, table: Table, once: bool, rng: np.random.Generator):
        super().__init__(table, once)
        self.rng = rng

    def propose(self, available: np.ndarray) -> tuple[int, dict[str, Any], bool, Any]:
        if self.once:
            row = int(self.rng.choice(np.flatnonzero(available)))
            return row, self.table.row_params(row), False, None
        params = self.table.random_params(self.rng)
        return self.table.nearest(params), params, False, None


class _CellGreedy(_Proposer):
    def __init__(self, table: Table, once: bool, rng: np.random.Generator, startup: int):
        super().__init__(table, once)
        self.rng, self.startup = rng, startup
        self.proposed = 0
        self.seen: list[tuple[int, np.ndarray]] = []  # (cell, observed values) of completed trials

    def _best_cells(self) -> list[int]:
        values = np.array([v for _, v in self.seen])
        gain = np.prod(np.clip(values - values.min(axis=0), 0, None), axis=1)  # single-point hypervolume, both max
        cells = np.array([c for c, _ in self.seen])
        means = {c: float(gain[cells == c].mean()) for c in set(cells.tolist())}
        return sorted(means, key=lambda c: -means[c])

    def propose(self, available: np.ndarray) -> tuple[int, dict[str, Any], bool, Any]:
        self.proposed += 1
        if self.proposed > self.startup and self.seen:
            for cell in self._best_cells():
                if not self.once:
                    params = self.table.random_params(self.rng, cell)
                    return self.table.nearest(params), params, False, None
                rows = np.flatnonzero(available & (self.table.cells == cell))
                if rows.size:
                    row = int(self.rng.choice(rows))
                    return row, self.table.row_params(row), False, None
        if self.once:
            row = int(self.rng.choice(np.flatnonzero(available)))
            return row, self.table.row_params(row), False, None
        params = self.table.random_params(self.rng)
        return self.table.nearest(params), params, False, None

    def tell(self, handle: Any, row: int, observed: Sequence[float] | None) -> None:
        if observed is not None:
            self.seen.append((int(self.table.cells[row]), np.asarray(observed, dtype=float)))


def _proposer(table: Table, searcher: Searcher, seed: int, num_samples: int, draw: str) -> _Proposer:
    rng = np.random.default_rng([seed, 7])
    once = draw == "once"
    if searcher.policy == "optuna":
        return _OptunaProposer(table, searcher, seed, num_samples, once)
    if searcher.policy == "uniform_rows":
        return _UniformRows(table, once, rng)
    if searcher.policy == "cell_greedy":
        return _CellGreedy(table, once, rng, searcher.startup)
    raise ValueError(f"unknown policy {searcher.policy!r}: expected one of {POLICIES}")


def measure(table: Table, row: int, mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A new measurement (draw="surrogate") of a configuration whose denoised (clean, aa) is
    ``mean``: a training-seed draw around it, then a binomial draw on the table's test images;
    (clean, aa, pgd20), pgd20 keeping the borrowed row's recorded gap above AutoAttack."""
    n = int(table.n_samples[row])
    latent = np.clip(mean + rng.normal(0.0, np.sqrt(table.noise_var)), 0.0, 1.0)
    clean, aa = rng.binomial(n, latent) / n
    return np.array([clean, aa, min(1.0, aa + table.pgd_gap[row])])


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
    ``draw``: "once" or "noise" (see the module docstring)."""
    if draw not in DRAWS:
        raise ValueError(f"unknown draw {draw!r}: expected one of {DRAWS}")
    if draw == "surrogate" and table.smoother is None:
        raise ValueError("draw='surrogate' needs a table with a smoother")
    proposer = _proposer(table, searcher, seed, num_samples, draw)
    noise_rng = np.random.default_rng([seed, 11])
    epochs = len(table.epoch_s[0])
    ladder = None
    if searcher.scheduler:
        s = searcher.scheduler
        ladder = RungLadder(
            ["max"] * len(PER_EPOCH_METRICS),
            grace_period=int(s.get("grace_period", 1)),
            reduction_factor=float(s.get("reduction_factor", 3)),
            max_t=epochs,
            **({"margin": float(s["margin"])} if "margin" in s else {}),
        )
    log = RunLog(workers=workers)
    finished: list[tuple[str, dict[str, float]]] = []  # completed with AutoAttack: the staged policy's evidence
    events: list[tuple[float, int, dict[str, Any]]] = []
    counter = 0
    available = np.ones(len(table.frame), dtype=bool)

    def launch(now: float) -> None:
        nonlocal counter
        row, params, cross_cell, handle = proposer.propose(available)
        if draw == "once":
            available[row] = False
            if not available.any():
                available[:] = True  # the pool is used up: start over
            measured = np.array([*table.values[row], table.values[row][1] + table.pgd_gap[row]])
            score = table.score[row]
        else:
            score = table.denoised(params)
            measured = measure(table, row, score, noise_rng)
        # The borrowed curves follow the configuration: shifted by its denoised difference to the row.
        shift = score - table.score[row]
        counter += 1
        state = {
            "handle": handle,
            "row": row,
            "key": f"t{counter}",
            "id": counter,
            "started": now,
            "epoch": 0,
            "phase": "epochs",
            "measured": measured,
            "score": score,
            "shift": shift,
            "cross_cell": cross_cell,
        }
        heapq.heappush(events, (now + table.fixed_cost_s, counter, state))

    def end(state: dict[str, Any], now: float, kind: str, reason: str = "") -> None:
        clean, aa, _ = state["measured"]
        proposer.tell(state["handle"], state["row"], (clean, aa) if kind == "complete" else None)
        if kind == "complete":
            finished.append((state["key"], {"clean_acc": float(clean), "aa_acc": float(aa)}))
        log.trials.append(
            TrialLog(
                state["row"],
                state["started"],
                now,
                kind,
                state["epoch"],
                now - state["started"],
                (float(clean), float(aa)),
                (float(state["score"][0]), float(state["score"][1])),
                state["cross_cell"],
                reason,
            )
        )

    for _ in range(workers):
        launch(0.0)
    while events:
        now, _, state = heapq.heappop(events)
        row = state["row"]
        if state["phase"] == "epochs":
            if state["epoch"] > 0 and ladder is not None:
                e = state["epoch"]
                # val/clean_acc follows clean_acc, val/pgd10_acc follows aa_acc (PER_EPOCH_METRICS' order)
                values = [
                    table.curves[m][row][e - 1] + d for m, d in zip(PER_EPOCH_METRICS, state["shift"], strict=True)
                ]
                if not ladder.on_result(state["key"], e, values):
                    end(state, now, "stopped")
                    if workers * now < budget_s:
                        launch(now)
                    continue
            if state["epoch"] < epochs:
                state["epoch"] += 1
                heapq.heappush(events, (now + table.epoch_s[row][state["epoch"] - 1], state["id"], state))
                continue
            state["phase"] = "pre_aa"
            heapq.heappush(events, (now + table.pre_aa_s[row], state["id"], state))
            continue
        if state["phase"] == "pre_aa":
            reason = None
            if searcher.aa_policy == "candidates":
                clean, _, pgd20 = state["measured"]
                metrics = {"clean_acc": float(clean), "pgd20_acc": float(pgd20)}
                reason = aa_verdict(metrics, finished, OBJECTIVES, searcher.aa_margin)
            state["phase"] = "done"
            state["reason"] = reason
            extra = table.eval_rest_s[row] + (0.0 if reason else table.aa_s[row])
            heapq.heappush(events, (now + extra, state["id"], state))
            continue
        reason = state.get("reason")
        end(state, now, "aa_skipped" if reason else "complete", reason or "")
        if workers * now < budget_s:
            launch(now)
    return log


def hv_curve(table: Table, log: RunLog, grid: np.ndarray, *, recorded: bool = False) -> np.ndarray:
    """Hypervolume, at each compute value in ``grid``, of the configurations completed by then at
    their denoised values (``recorded``: the rows' recorded values, draw="once" only)."""
    at, rows, scores = log.completions()
    values = table.values[rows] if recorded else scores
    order = np.argsort(at, kind="stable")
    at, values = at[order], values[order]
    out = np.zeros(len(grid))
    for i, c in enumerate(grid):
        k = int(np.searchsorted(at, c, side="right"))
        out[i] = hypervolume(values[:k], table.modes, table.reference) if k else 0.0
    return out


def front_losses(table: Table, log: RunLog) -> dict[str, Any]:
    """Trials the run stopped early or did not run AutoAttack on, although their (clean, aa) as
    measured (or as it would have been measured) is on the front of every trial the run drew:
    ``stopped`` by rung (epoch), ``skipped`` (staged AutoAttack)."""
    drawn = [t for t in log.trials if t.state in ("complete", "stopped", "aa_skipped")]
    if not drawn:
        return {"stopped": {}, "skipped": 0}
    front = set(non_dominated(np.array([t.observed for t in drawn]), table.modes))
    stopped: dict[int, int] = {}
    skipped = 0
    for i, t in enumerate(drawn):
        if i not in front:
            continue
        if t.state == "stopped":
            stopped[t.epochs] = stopped.get(t.epochs, 0) + 1
        elif t.state == "aa_skipped":
            skipped += 1
    return {"stopped": stopped, "skipped": skipped}


def skipped_on_front(table: Table, log: RunLog) -> int:
    """Trials whose AutoAttack was skipped but whose (clean, aa) would have been on the front of
    that run's evaluated trials (the staged policy's claim is that this never happens)."""
    return int(front_losses(table, log)["skipped"])
