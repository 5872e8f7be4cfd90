"""The seed papers' recipes, shipped as configurations: one YAML file per recipe in afm_ray/recipes/
(package data, read with importlib.resources, so a wheel carries them; docs/recipes.md lists them).

A recipe names its source (the paper, and the official code's files it was read from), its
published number (or says that none was found for the setting) and its budget as the official code
has it, then lists where afm-ray's config cannot follow that code (`deviations`). Its `fixed` keys
are a full run's config; `resources` and `max_failures` say how one run is placed on a cluster, as
in a search space. Keys of issue 21's other half (checkpoint selection, weight averaging, teacher
ensembles) may appear in `fixed`: a build whose config does not know them yet sets them aside and
says so (`Recipe.not_applied`), so a recipe stays loadable before and after that work lands.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from afm_ray.config import ExperimentConfig, apply_overrides, valid_keys
from afm_ray.errors import ConfigError, unknown_value
from afm_ray.names import DEFAULT_OBJECTIVES
from afm_ray.search.space import SearchSpace
from afm_ray.search.specs import TrialResources, parse_resources, parse_sampler, parse_scheduler
from afm_ray.yaml_loading import parse_yaml, read_text_file

# Config keys a recipe may set that this build's config may not know yet (issue 21: which weights are
# the student, AKD's teacher techniques): set aside, with a line saying so, where they are unknown.
PENDING_KEYS = ("student.select", "student.average", "student.ema_decay", "student.swa_start", "teacher.select")
TOP_LEVEL_KEYS = (
    "name", "method", "description", "source", "published", "budget", "deviations", "fixed", "resources",
    "max_failures",
)  # fmt: skip


@dataclass(frozen=True)
class Published:
    """The number a paper reports for the recipe's exact setting; None where none was found."""

    aa_acc: float | None
    clean_acc: float | None
    setting: str  # what was measured: data, attack, student, teacher, extra data, budget


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str  # the paper's name of the method (RSLAD, AdaAD, ...)
    description: str
    paper: str
    code: str  # the official code's repository and the files the budget was read from
    published: Published
    budget: dict[str, str]  # as the official code has it
    deviations: tuple[str, ...]  # where the config below cannot follow the official code, and why
    fixed: dict[str, Any]  # the run's config keys this build applies
    resources: TrialResources
    max_failures: int
    not_applied: dict[str, Any] = field(default_factory=dict)  # PENDING_KEYS this build does not know
    path: str = ""  # the shipped name or the file it was read from

    def config(self, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
        """The run's config with ``overrides`` (parsed --set values) on top, validated."""
        return apply_overrides(self.fixed, dict(overrides or {}), source=f"recipe {self.name}")

    def space(self, overrides: Mapping[str, Any] | None = None) -> SearchSpace:
        """The recipe as a search space with nothing searched (`run_space`); ``overrides`` replace
        fixed keys (validated first by `config`)."""
        self.config(overrides)
        fixed = {**self.fixed, **dict(overrides or {})}
        return run_space(self.name, fixed, self.resources, self.max_failures, description=self.description)


def run_space(
    name: str, fixed: Mapping[str, Any], resources: TrialResources, max_failures: int, *, description: str = ""
) -> SearchSpace:
    """One run's config as a search space with nothing searched: what the sweep's preflight
    (afm_ray.preflight), cost model and teacher preparation take."""
    where = f"run {name}"
    return SearchSpace(
        name=name,
        description=description,
        experiment=f"afm-ray-final-{name}",
        fixed=dict(fixed),
        search=(),
        objectives=DEFAULT_OBJECTIVES,
        num_samples=1,
        sampler=parse_sampler(None, 1, where),
        scheduler=parse_scheduler(None, DEFAULT_OBJECTIVES, where),
        resources=resources,
        max_concurrent_trials=0,
        max_failures=max_failures,
        seed=0,
    )


def _shipped_dir() -> Any:
    return resources.files("afm_ray") / "recipes"


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped inside the package (file stems of afm_ray/recipes/*.yaml)."""
    return sorted(e.name[: -len(".yaml")] for e in _shipped_dir().iterdir() if e.name.endswith(".yaml"))


def load_recipe(name: str) -> Recipe:
    """A shipped recipe by name, or a recipe YAML file by path; a ConfigError names the shipped ones."""
    path = Path(name).expanduser()
    if path.exists() or path.is_symlink():
        text, where = read_text_file(path, "recipe"), str(path.resolve())
    elif name.removesuffix(".yaml") in shipped_recipes():
        where = name.removesuffix(".yaml")
        text = (_shipped_dir() / f"{where}.yaml").read_text()
    else:
        raise unknown_value("--recipe: unknown recipe", name, shipped_recipes())
    return parse_recipe(parse_yaml(text, where), path=where)


def parse_recipe(raw: Any, *, path: str = "") -> Recipe:
    where = f"recipe {path or '?'}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise unknown_value(f"{where}: unknown top-level key", key, TOP_LEVEL_KEYS)
    fixed = dict(_mapping(raw.get("fixed"), f"{where}: fixed"))
    known = set(valid_keys())
    not_applied = {k: fixed.pop(k) for k in list(fixed) if k in PENDING_KEYS and k not in known}
    for key in fixed:
        if key not in known:
            raise unknown_value(f"{where}: unknown config key", key, sorted(known))
    published = _mapping(raw.get("published") or {}, f"{where}: published")
    recipe = Recipe(
        name=str(raw.get("name") or Path(path).stem),
        method=str(raw.get("method", "")),
        description=str(raw.get("description", "")),
        paper=str(_mapping(raw.get("source") or {}, f"{where}: source").get("paper", "")),
        code=str(_mapping(raw.get("source") or {}, f"{where}: source").get("code", "")),
        published=Published(
            aa_acc=_fraction(published.get("aa_acc"), f"{where}: published.aa_acc"),
            clean_acc=_fraction(published.get("clean_acc"), f"{where}: published.clean_acc"),
            setting=str(published.get("setting", "")),
        ),
        budget={str(k): str(v) for k, v in _mapping(raw.get("budget") or {}, f"{where}: budget").items()},
        deviations=tuple(str(d) for d in raw.get("deviations") or ()),
        fixed=fixed,
        resources=parse_resources(raw.get("resources"), where),
        max_failures=int(raw.get("max_failures", 2)),
        not_applied=not_applied,
        path=path,
    )
    recipe.config()  # every fixed value valid now, not when a job starts
    return recipe


def published_for(cfg: ExperimentConfig, recipes: list[Recipe] | None = None) -> tuple[Recipe, Published] | None:
    """The recipe whose published number is for ``cfg``'s setting: same data, method, student
    architecture and evaluation budget (eps and norm); None if no shipped recipe publishes one."""
    for recipe in recipes if recipes is not None else [load_recipe(n) for n in shipped_recipes()]:
        theirs = recipe.config()
        same = (
            theirs.data.name == cfg.data.name
            and theirs.method.name == cfg.method.name
            and theirs.student.arch == cfg.student.arch
            and theirs.attack.norm == cfg.attack.norm
            and math.isclose(theirs.eval_eps, cfg.eval_eps, rel_tol=1e-6)
        )
        if same and recipe.published.aa_acc is not None:
            return recipe, recipe.published
    return None


def describe(recipe: Recipe) -> str:
    """The recipe in a few lines: source, published number, budget, deviations, keys set aside."""
    pub = recipe.published
    number = (
        f"AutoAttack {100 * pub.aa_acc:.2f}%" + (f", clean {100 * pub.clean_acc:.2f}%" if pub.clean_acc else "")
        if pub.aa_acc is not None
        else "none found"
    )
    lines = [
        f"recipe {recipe.name} ({recipe.method}): {recipe.description}",
        f"  paper      {recipe.paper}",
        f"  code       {recipe.code}",
        f"  published  {number} ({pub.setting})",
        "  budget     " + "; ".join(f"{k} {v}" for k, v in recipe.budget.items()),
    ]
    lines += [f"  deviation  {d}" for d in recipe.deviations]
    if recipe.not_applied:
        keys = ", ".join(f"{k}={v}" for k, v in recipe.not_applied.items())
        lines.append(f"  not applied (this build's config has no such key yet): {keys}")
    return "\n".join(lines)


def _mapping(value: Any, label: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{label}: expected a mapping, got {value!r}")
    return value


def _fraction(value: Any, label: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{label}: expected an accuracy in [0, 1] or null, got {value!r}")
    return float(value)


__all__ = ["Published", "Recipe", "describe", "load_recipe", "published_for", "shipped_recipes"]
