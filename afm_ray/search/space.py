"""Search spaces: a YAML file -> a validated `SearchSpace` -> an Optuna define-by-run function.

A space is a YAML file (`--space path/to/space.yaml`) or one shipped inside the package, named
by its file stem (`--space cifar10_resnet18`; afm_ray/search_spaces/, read with importlib.resources,
so an installed wheel has them too). Schema (every top-level key is optional except `search`;
see afm_ray/search_spaces/default.yaml):

    name: embedded-default             # names the sweep, the MLflow experiment and the Optuna study
    description: what it is for and the result it expects
    experiment: afm-ray-default        # MLflow experiment (default: afm-ray-<name>)
    fixed:                             # dotted config keys held constant in every trial
      data.name: mnist5k
    search:                            # dotted config keys -> one distribution each
      attack.eps: {uniform: [0.05, 0.15]}
      optim.lr: {loguniform: [0.01, 0.2]}
      attack.steps: {int: [2, 10], step: 2}
      augment.policy: {choice: [crop_flip, randaugment]}
      method.tau: {loguniform: [1, 10], when: {method.name: [advfunmatch, ard]}}
    objectives:                        # 1 = single objective (ASHA allowed), 2+ = NSGA-II
      - {metric: clean_acc, mode: max}
      - {metric: aa_acc, mode: max}
    num_samples: 6                     # trials (grid: default and most = the number of grid points)
    sampler: {name: tpe}               # tpe | nsga2 | random | grid (every combination once)
    scheduler: {name: fifo}            # or {name: asha, metric: val/pgd10_acc, grace_period: 2}
    resources: {num_workers: 1, cpus_per_worker: 1, gpus_per_worker: 0, memory_per_worker: 0}  # per Train
                                       # worker; memory in GiB; the sweep's --num-workers etc. override
    max_concurrent_trials: 0           # trials at once; 0 = as many as the cluster holds at its largest
                                       # size (afm_ray.sweep.capacity); never more than that
    max_failures: 2                    # worker failures a trial survives (from its checkpoint)
    seed: 0                            # sampler seed

The keys in `fixed` and `search` are exactly the config keys of afm_ray.config; they reach
the worker config and the MLflow params unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from afm_ray.config import ExperimentConfig, apply_overrides, from_flat, valid_keys
from afm_ray.errors import ConfigError, unknown_value
from afm_ray.names import DEFAULT_OBJECTIVES, OBJECTIVE_METRICS, PER_EPOCH_METRICS, Objective
from afm_ray.search.specs import (
    SamplerSpec,
    SchedulerSpec,
    TrialResources,
    is_number,
    parse_resources,
    parse_sampler,
    parse_scheduler,
    positive_int,
)
from afm_ray.yaml_loading import parse_yaml, read_text_file

TOP_LEVEL_KEYS = (
    "name",
    "description",
    "experiment",
    "fixed",
    "search",
    "objectives",
    "num_samples",
    "sampler",
    "scheduler",
    "resources",
    "max_concurrent_trials",
    "max_failures",
    "seed",
)
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")


@dataclass(frozen=True)
class Distribution:
    key: str
    kind: str  # uniform | loguniform | int | choice
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (key, allowed values) that must all hold

    def applies(self, params: Mapping[str, Any]) -> bool:
        return all(params.get(k) in allowed for k, allowed in self.when)

    def suggest(self, trial: Any) -> Any:
        """Ask an Optuna trial for a value; the parameter's name is the dotted config key."""
        if self.kind == "uniform":
            return trial.suggest_float(self.key, self.low, self.high, step=self.step)
        if self.kind == "loguniform":
            return trial.suggest_float(self.key, self.low, self.high, log=True)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1))
        return trial.suggest_categorical(self.key, list(self.choices))


@dataclass(frozen=True)
class SearchSpace:
    name: str
    description: str
    experiment: str
    fixed: dict[str, Any]
    search: tuple[Distribution, ...]
    objectives: tuple[Objective, ...]
    num_samples: int
    sampler: SamplerSpec
    scheduler: SchedulerSpec
    resources: TrialResources
    max_concurrent_trials: int
    max_failures: int
    seed: int
    source: str = ""  # the YAML text, logged to the sweep's parent run
    path: str = ""  # what --space takes to load it again: a file's absolute path or a shipped space's name

    @functools.cached_property
    def base(self) -> ExperimentConfig:
        """The config every trial starts from: the fixed keys (validated when the space was parsed)."""
        return from_flat(self.fixed)

    def define_by_run(self) -> DefineByRun:
        """Optuna define-by-run function: conditional keys are only asked when they apply."""
        return DefineByRun(dict(self.fixed), self.search)


@dataclass(frozen=True)
class DefineByRun:
    """Picklable (Tune checkpoints its searcher) define-by-run function for OptunaSearch."""

    fixed: dict[str, Any]
    search: tuple[Distribution, ...]

    def __call__(self, trial: Any) -> dict[str, Any]:
        params: dict[str, Any] = dict(self.fixed)
        for dist in self.search:  # a condition refers to keys fixed or searched above it
            if dist.applies(params):
                params[dist.key] = dist.suggest(trial)
        # Ray's OptunaSearch merges these constants with the values the trial suggested.
        return dict(self.fixed)


DEFAULT_SPACE = "default"  # the embedded default: afm_ray/search_spaces/default.yaml


def _shipped_dir() -> Any:
    return resources.files("afm_ray") / "search_spaces"


def shipped_spaces() -> list[str]:
    """Names of the spaces shipped inside the package (file stems of afm_ray/search_spaces/*.yaml)."""
    return sorted(entry.name[: -len(".yaml")] for entry in _shipped_dir().iterdir() if entry.name.endswith(".yaml"))


def embedded_default() -> dict[str, Any]:
    """The embedded default as a single-run config: the fixed keys of the default space."""
    return dict(load_search_space(DEFAULT_SPACE).fixed)


def read_space_text(space: str | Path) -> tuple[str, str]:
    """(YAML text, what --space takes to load it again) of a file path or a shipped space's name.

    A path that exists wins; otherwise a shipped name (with or without .yaml) is looked up in the
    package. Anything else is a ConfigError naming the shipped spaces.
    """
    path = Path(space).expanduser()
    if path.exists() or path.is_symlink():  # a path the user named: read_text_file says what is wrong with it
        return read_text_file(path, "search space"), str(path.resolve())
    name = str(space).removesuffix(".yaml") if "/" not in str(space) else ""
    shipped = shipped_spaces()
    if name in shipped:
        return (_shipped_dir() / f"{name}.yaml").read_text(), name
    hint = f"; did you mean --space {path.stem}?" if path.stem in shipped else ""
    if "/" in str(space) or str(space).endswith(".yaml"):  # meant as a file
        raise ConfigError(
            f"search space {str(space)!r} does not exist; see search_spaces/ for examples "
            f"(shipped: {', '.join(shipped)}){hint}"
        )
    raise ConfigError(f"search space {str(space)!r} is neither a file nor a shipped space ({', '.join(shipped)}){hint}")


def load_search_space(space: str | Path = DEFAULT_SPACE, overrides: Mapping[str, Any] | None = None) -> SearchSpace:
    """A validated space from a YAML file or a shipped space's name (default: the embedded default)."""
    text, where = read_space_text(space)
    label = where if "/" in where else f"{where}.yaml"
    raw = parse_yaml(text, label)
    if raw is None:
        raise ConfigError(f"search space {label!r} is empty; expected a YAML mapping")
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"search space {label!r}: expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    return parse_search_space(raw, source=text, path=where, overrides=overrides, default_name=Path(label).stem)


def parse_search_space(
    raw: Mapping[str, Any],
    *,
    source: str = "",
    path: str = "",
    default_name: str = "sweep",
    overrides: Mapping[str, Any] | None = None,
) -> SearchSpace:
    """Validate everything before any resource is reserved: one clear error per problem."""
    where = path or "search space"
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise unknown_value(f"{where}: unknown top-level key", key, TOP_LEVEL_KEYS)
    name = str(raw.get("name") or default_name)
    fixed = _mapping(raw.get("fixed", {}), f"{where}: fixed")
    search_raw = _mapping(raw.get("search") or {}, f"{where}: search")
    if not search_raw:
        raise ConfigError(
            f"{where}: search is empty; give at least one distribution, e.g. search: {{attack.eps: {{uniform: "
            "[0.05, 0.15]}} (for one run with fixed keys: python -m afm_ray.train)"
        )
    known = valid_keys()
    for key in list(fixed) + list(search_raw):
        if key not in known:
            raise unknown_value(f"{where}: unknown config key", key, known)
    both = sorted(set(fixed) & set(search_raw))
    if both:
        raise ConfigError(f"{where}: {both[0]!r} is both fixed and searched; keep it in one of the two")
    file_fixed, fixed = fixed, {**fixed, **dict(overrides or {})}
    for key in overrides or {}:
        if key not in known:
            raise unknown_value("--set: unknown config key", key, known)
        search_raw.pop(key, None)  # an override pins a searched key

    search = tuple(_parse_distribution(key, spec, where, fixed, list(search_raw)) for key, spec in search_raw.items())
    objectives = _parse_objectives(raw.get("objectives"), where)
    scheduler = parse_scheduler(raw.get("scheduler"), objectives, where)
    resources = parse_resources(raw.get("resources"), where)
    grid = _grid_size(search, fixed, raw.get("sampler"), where)
    num_samples = positive_int(raw.get("num_samples", grid or 6), f"{where}: num_samples")
    if grid and num_samples > grid:
        raise ConfigError(f"{where}: num_samples {num_samples} exceeds the {grid} points of the grid; use <= {grid}")
    sampler = parse_sampler(raw.get("sampler"), num_samples, where)
    max_concurrent = _non_negative_int(raw.get("max_concurrent_trials", 0), f"{where}: max_concurrent_trials")
    max_failures = _non_negative_int(raw.get("max_failures", 2), f"{where}: max_failures")
    seed = _non_negative_int(raw.get("seed", 0), f"{where}: seed")

    space = SearchSpace(
        name=name,
        description=str(raw.get("description", "")),
        experiment=str(raw.get("experiment") or f"afm-ray-{name}"),
        fixed=fixed,
        search=search,
        objectives=objectives,
        num_samples=num_samples,
        sampler=sampler,
        scheduler=scheduler,
        resources=resources,
        max_concurrent_trials=max_concurrent,
        max_failures=max_failures,
        seed=seed,
        source=source,
        path=path,
    )
    _check_extremes(space, where, file_fixed, dict(overrides or {}))
    _check_rungs(scheduler, fixed, {d.key for d in search}, where)
    return space


def _parse_distribution(key: str, spec: Any, where: str, fixed: Mapping[str, Any], order: list[str]) -> Distribution:
    label = f"{where}: search.{key}"
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"{label}: expected a distribution such as {{uniform: [low, high]}} or {{choice: [a, b]}}, got {spec!r}"
        )
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    extra = [k for k in spec if k not in DISTRIBUTIONS and k not in ("step", "when")]
    if extra:
        raise unknown_value(f"{label}: unknown field", extra[0], DISTRIBUTIONS + ("step", "when"))
    if len(kinds) != 1:
        raise ConfigError(f"{label}: give exactly one of {', '.join(DISTRIBUTIONS)}, got {list(spec) or 'none'}")
    kind = kinds[0]
    when = _parse_when(spec.get("when"), label, fixed, order[: order.index(key)])
    step = spec.get("step")
    if kind == "choice":
        choices = spec["choice"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{label}: choice needs a non-empty list of values, got {choices!r}")
        if step is not None:
            raise ConfigError(f"{label}: step applies to uniform/int, not choice")
        return Distribution(key, kind, choices=tuple(choices), when=when)
    bounds = spec[kind]
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(is_number(b) for b in bounds)):
        raise ConfigError(f"{label}: {kind} needs [low, high] numbers, got {bounds!r}")
    low, high = float(bounds[0]), float(bounds[1])
    if not low < high:
        raise ConfigError(f"{label}: {kind} needs low < high, got [{bounds[0]}, {bounds[1]}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{label}: loguniform needs low > 0, got {bounds[0]}")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"{label}: int needs integer bounds, got {bounds!r}")
    if step is not None and (not is_number(step) or step <= 0 or kind == "loguniform"):
        raise ConfigError(f"{label}: step must be a positive number on uniform or int, got {step!r}")
    return Distribution(key, kind, low=low, high=high, step=float(step) if step is not None else None, when=when)


def _parse_when(when: Any, label: str, fixed: Mapping[str, Any], earlier: list[str]) -> tuple:
    if when is None:
        return ()
    if not isinstance(when, Mapping) or not when:
        raise ConfigError(f"{label}: when must map a config key to allowed values, e.g. {{method.name: [ard]}}")
    out = []
    for key, allowed in when.items():
        if key not in fixed and key not in earlier:
            raise ConfigError(f"{label}: when refers to {key!r}, which is neither fixed nor searched above it")
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        out.append((key, values))
    return tuple(out)


def _parse_objectives(raw: Any, where: str) -> tuple[Objective, ...]:
    if raw is None:
        return DEFAULT_OBJECTIVES
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: objectives must be a non-empty list of {{metric: NAME, mode: max|min}}")
    out = []
    for item in raw:
        if not isinstance(item, Mapping) or set(item) - {"metric", "mode"} or "metric" not in item:
            raise ConfigError(f"{where}: objective {item!r} must be {{metric: NAME, mode: max|min}}")
        metric, mode = str(item["metric"]), str(item.get("mode", "max"))
        if metric not in OBJECTIVE_METRICS + PER_EPOCH_METRICS:
            raise unknown_value(f"{where}: unknown objective metric", metric, OBJECTIVE_METRICS)
        if mode not in ("max", "min"):
            raise ConfigError(f"{where}: objective {metric} has mode {mode!r}; expected max or min")
        out.append(Objective(metric, mode))
    if len({o.metric for o in out}) != len(out):
        raise ConfigError(f"{where}: objectives repeat a metric: {[o.metric for o in out]}")
    return tuple(out)


def _check_rungs(scheduler: SchedulerSpec, fixed: Mapping[str, Any], searched: set[str], where: str) -> None:
    """A successive-halving scheduler needs a rung before the last epoch, or it never stops anything."""
    if not scheduler.halving or "optim.epochs" in searched:
        return
    epochs = from_flat(fixed).optim.epochs
    if scheduler.grace_period >= epochs:
        raise ConfigError(
            f"{where}: scheduler.grace_period {scheduler.grace_period} leaves no rung before the last epoch "
            f"(optim.epochs {epochs}); use a grace_period below {epochs}"
        )


def grid_points(search: tuple[Distribution, ...], fixed: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination the `grid` sampler runs: a key is varied only where its `when:` holds.
    A ConfigError names a distribution with infinitely many values (loguniform, uniform without step)."""
    points: list[dict[str, Any]] = [{}]
    for dist in search:
        values, grown = _grid_values(dist), []
        for point in points:
            applies = dist.applies({**fixed, **point})
            grown.extend([{**point, dist.key: v} for v in values] if applies else [point])
        points = grown
    return points


def _grid_values(dist: Distribution) -> list[Any]:
    if dist.kind == "choice":
        return list(dist.choices)
    if dist.kind == "int":
        return list(range(int(dist.low), int(dist.high) + 1, int(dist.step or 1)))
    if dist.kind == "uniform" and dist.step:
        return [dist.low + i * dist.step for i in range(int((dist.high - dist.low) / dist.step + 1e-9) + 1)]
    raise ConfigError(
        f"search.{dist.key}: the grid sampler needs finitely many values (choice, int, or uniform with step); "
        f"got {dist.kind}" + (" without step" if dist.kind == "uniform" else "")
    )


def _grid_size(search: tuple[Distribution, ...], fixed: Mapping[str, Any], raw_sampler: Any, where: str) -> int:
    if not (isinstance(raw_sampler, Mapping) and raw_sampler.get("name") == "grid"):
        return 0
    try:
        return len(grid_points(search, fixed))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_extremes(space: SearchSpace, where: str, file_fixed: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Build the worker config at the corners of every distribution: a value the engine
    rejects (eps < 0, steps < 0, tau <= 0, an unknown policy) fails now, not in trial 17.
    A bad fixed value is blamed on the file, or on --set when the override brings it."""
    apply_overrides(file_fixed, overrides, source=f"{where}: fixed")
    base = dict(space.fixed)
    for dist in space.search:
        values = dist.choices if dist.kind == "choice" else (dist.low, dist.high)
        for value in values:
            if dist.kind == "int":
                value = int(value)
            conditions = {k: allowed[0] for k, allowed in dist.when}
            try:
                from_flat({**base, **conditions, dist.key: value})
            except ConfigError as exc:
                raise ConfigError(f"{where}: search.{dist.key} = {value!r}: {exc}") from None


def _mapping(value: Any, label: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{label}: expected a mapping, got {value!r}")
    return dict(value)


def _non_negative_int(value: Any, label: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{label}: expected an integer >= 0, got {value!r}")
    return value
