"""Typed, frozen run configuration: YAML (or dotted overrides) in, flat dotted dict out.

The same dotted keys (``attack.eps``, ``method.tau``, ...) travel unchanged from a YAML
search space through Optuna and Tune into the worker config and into MLflow params, so
a run recorded in MLflow can be re-run from its params alone (``from_flat`` accepts the
strings MLflow gives back).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afm_ray.errors import ConfigError, unknown_value
from afm_ray.names import (
    AA_POLICIES,
    AMP_SETTINGS,
    ATTACKS,
    CONFIG_RANDOM_STARTS,
    DATASETS,
    HPARAM_NAMES,
    LR_SCHEDULES,
    METHOD_HPARAMS,
    METHODS,
    MODELS,
    NORMS,
    STUDENT_AVERAGES,
    STUDENT_SELECTIONS,
    TEACHER_METHODS,
    TEACHER_SELECTIONS,
    TRAIN_TEACHER,
    parse_policy,
)
from afm_ray.yaml_loading import load_yaml_mapping, parse_yaml

# Default l_inf budgets of the evaluation protocol (docs/methods.md). MNIST-like data uses 0.1,
# the "small demo" budget: our embedded MNIST subset is a demo, and 0.3 needs far longer
# training than a laptop demo allows.
DEFAULT_EPS = {"mnist5k": 0.1, "digits": 0.1, "cifar10": 8 / 255, "cifar100": 8 / 255, "parquet": 8 / 255}
DEFAULT_L2_EPS = 0.5
# Images are held whole in memory as uint8: 4096 x 4096 x 3 is 50 MB per image already.
MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist5k"  # mnist5k (embedded default) | digits | cifar10 | cifar100 | parquet
    root: str = ""  # folder or pyarrow URI for cifar10/cifar100/parquet; unused for embedded data
    test_fraction: float = 0.2  # held-out share for datasets that ship without a test split
    image_size: int = 0  # 0 keeps the native size; 32 pads 28x28 digits for 32x32 architectures
    seed: int = 0  # fixes the train/test split, so every trial sees the same test images


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "small_cnn"  # a name from afm_ray.names.MODELS
    width: int = 16  # small_cnn channels / WRN widen factor; 0 = the architecture's default
    depth: int = 0  # WRN depth; 0 = the architecture's default


@dataclass(frozen=True)
class StudentConfig(ModelConfig):
    """The student's architecture, and which of its weights are the student (afm_ray.student_weights):
    averaged first (what is validated, evaluated, exported), then selected among the epochs."""

    select: str = "last"  # last | best_pgd (the epoch of the best val/pgd10_acc on the held-out split)
    average: str = "none"  # none | ema (per step) | swa (per epoch, batch-norm statistics recomputed)
    # EMA decay per optimiser step, warmed up as min(decay, (1 + t) / (10 + t)) over the t steps so far.
    ema_decay: float = 0.999
    swa_start: float = 0.75  # fraction of optim.epochs after which SWA averages each epoch's weights


@dataclass(frozen=True)
class TeacherConfig:
    arch: str = "small_cnn"
    width: int = 32
    depth: int = 0
    # A teacher checkpoint (path or URI) to load, or several, comma-separated: an ensemble (the mean of
    # the members' probabilities at the method's temperature, docs/methods.md). A checkpoint may be an
    # afm-ray checkpoint, a plain state dict (RobustBench, official AT/TRADES scripts: afm_ray.weight_layouts)
    # or a folder of epoch checkpoints (teacher.select picks one). "train" = train one first (cached by
    # config hash). "" also trains in single runs; a sweep refuses it, so a costly teacher is never
    # trained by accident.
    checkpoint: str = ""
    method: str = "pgd_at"  # how a missing teacher is trained: pgd_at | trades
    epochs: int = 5  # epochs for training a missing teacher
    cache_dir: str = ""  # where trained teachers are cached; "" = ~/.cache/afm_ray/teachers
    # Which epoch of a trained teacher (or of a folder of epoch checkpoints) teaches: last | best_pgd
    # (the best val/pgd10_acc of the teacher's own held-out split) | epoch:N (an early-stopped teacher).
    select: str = "last"

    @property
    def members(self) -> tuple[str, ...]:
        """The checkpoints of teacher.checkpoint, in order: one, or an ensemble's several."""
        return tuple(part.strip() for part in self.checkpoint.split(","))

    @property
    def trained_here(self) -> bool:
        """Whether the project trains this teacher (teacher.checkpoint "" or "train")."""
        return self.checkpoint in ("", TRAIN_TEACHER)

    @property
    def select_epoch(self) -> int | None:
        """N of teacher.select epoch:N; None for last and best_pgd."""
        return int(self.select.split(":", 1)[1]) if self.select.startswith("epoch:") else None


@dataclass(frozen=True)
class MethodConfig:
    name: str = "advfunmatch"  # a name from afm_ray.names.METHODS
    # None = the method's own default (from its official code; see methods.py).
    tau: float | None = None  # softmax temperature
    alpha: float | None = None  # AdaAD/ARD mixing weight of the adversarial term
    beta: float | None = None  # TRADES robustness weight
    lam: float | None = None  # AKD weight of the one-hot label in the target


@dataclass(frozen=True)
class AttackConfig:
    """The inner maximisation used during training (evaluation has its own fixed protocol)."""

    eps: float | None = None  # radius in pixel units; None = the dataset's default budget
    step_size: float | None = None  # None = eps / 4 (2/255 at 8/255, the usual PGD-10 setting)
    steps: int = 10
    norm: str = "linf"  # linf | l2
    random_start: str = "default"  # default (the method's own) | uniform | normal | none


@dataclass(frozen=True)
class AugmentConfig:
    policy: str = "crop_flip"  # e.g. none, crop_flip, autoaugment+cutmix (afm_ray.names.AUGMENT_POLICIES)


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 10
    batch_size: int = 128  # per worker
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"  # cosine | step (x0.1 at 50% and 75%) | constant
    warmup_epochs: int = 0  # linear warm-up before the schedule


@dataclass(frozen=True)
class EvalConfig:
    eps: float | None = None  # None = the dataset's default budget (fixed across a sweep)
    samples: int = 500  # test images for the final evaluation; 0 = the whole test split
    attacks: str = "clean,pgd20,cw,aa"  # final evaluation; comma-separated
    val_samples: int = 256  # fixed held-out subset for the cheap per-epoch PGD-10
    batch_size: int = 0  # attack batch; 0 = chosen per model and device (afm_ray.eval_batch)
    # all | candidates: in a sweep, run AutoAttack only for trials whose PGD-20 result (an upper
    # bound on AutoAttack) is not dominated by a finished trial's AutoAttack (afm_ray.search.staged_aa).
    aa_policy: str = "all"
    # How far a finished trial's AutoAttack must clear this trial's PGD-20 before AutoAttack is
    # skipped (accuracy units); see afm_ray.search.staged_aa for why.
    aa_margin: float = 0.01


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (inside Ray Train the worker's device wins)
    checkpoint_every: int = 1  # epochs between checkpoints; the last epoch always checkpoints
    output_dir: str = "afm_ray_runs"  # where a plain-process run writes checkpoints
    resume_from: str = ""  # a checkpoint directory to resume from
    # auto | bf16 | off: autocast for the training step, attack included (evaluation stays fp32).
    # auto = bf16 on CUDA and on CPUs with native bf16 (avx512_bf16 / amx_bf16), fp32 elsewhere
    # (emulated bf16 is slower than fp32). Chosen by measurement (docs/defaults_cpu.md): with
    # channels_last, 1.86x faster training at the same accuracy within noise (docs/fidelity_cpu.md).
    amp: str = "auto"
    # NHWC activations and weights for student and teacher: 1.2-1.4x the contiguous step on the
    # CPU (docs/defaults_cpu.md), and the layout of cuDNN's tensor-core convolutions.
    channels_last: bool = True
    # torch.compile the student: off, no measurable gain on the CPU (docs/defaults_cpu.md), and
    # every trial pays the compile time again.
    compile: bool = False


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # Values that depend on other values; resolved here so every consumer agrees.
    @property
    def train_eps(self) -> float:
        return self.attack.eps if self.attack.eps is not None else default_eps(self.data.name, self.attack.norm)

    @property
    def train_step_size(self) -> float:
        return self.attack.step_size if self.attack.step_size is not None else self.train_eps / 4

    @property
    def eval_eps(self) -> float:
        return self.eval.eps if self.eval.eps is not None else default_eps(self.data.name, self.attack.norm)

    @property
    def eval_attacks(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.eval.attacks.split(",") if a.strip())


def default_eps(dataset: str, norm: str = "linf") -> float:
    return DEFAULT_L2_EPS if norm == "l2" else DEFAULT_EPS.get(dataset, 8 / 255)


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(ExperimentConfig)[f.name] for f in dataclasses.fields(ExperimentConfig)
}


def _section_types(section: type) -> dict[str, Any]:
    return typing.get_type_hints(section)


def valid_keys() -> list[str]:
    return [f"{s}.{k}" for s, t in SECTIONS.items() for k in _section_types(t)]


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert YAML/CLI/MLflow values (often strings) to the field's declared type."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if optional else [annotation]
    base = args[0]
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        if base is str and value is None:
            return ""
        raise ConfigError(f"{key}: got {value!r}, expected a {base.__name__}")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in (
                "true",
                "1",
                "yes",
                "on",
                "false",
                "0",
                "no",
                "off",
            ):
                return value.strip().lower() in ("true", "1", "yes", "on")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                value = int(value)
            out = value if isinstance(value, int) else int(str(value).strip())
            if not -(2**63) <= out < 2**63:  # seeds and sizes reach torch and numpy as int64
                raise ConfigError(f"{key}: got {out}, expected an integer of at most 19 digits (int64)")
            return out
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value) if not isinstance(value, str) else _parse_float(value)
            if not math.isfinite(out):  # no setting here means anything at inf or nan
                raise ConfigError(f"{key}: got {value!r}, expected a finite number")
            return out
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            if isinstance(value, bool):  # YAML 1.1 reads a bare off/on as a boolean: `run.amp: off`
                return "on" if value else "off"
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[base]
        raise ConfigError(f"{key}: got {value!r}, expected {want}{' or null' if optional else ''}") from None
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _parse_float(text: str) -> float:
    # Accept "8/255", the way budgets are written in this field.
    text = text.strip()
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"attack": {"eps": 0.1}} -> {"attack.eps": 0.1}; already-dotted keys pass through."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        dotted = f"{prefix}{key}"
        inner = flatten(value, dotted + ".") if isinstance(value, Mapping) else {dotted: value}
        twice = sorted(set(inner) & set(flat))
        if twice:  # `attack: {eps: 0.1}` and `attack.eps: 0.2` in one file
            raise ConfigError(f"config key {twice[0]!r} is given twice (nested and dotted); give each key once")
        flat.update(inner)
    return flat


def from_flat(values: Mapping[str, Any], *, ignore_unknown: bool = False) -> ExperimentConfig:
    """Build and validate a config from dotted (or nested) keys; missing keys keep defaults."""
    flat = flatten(values)
    grouped: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    keys = valid_keys()
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or name not in _section_types(SECTIONS[section]):
            if ignore_unknown:
                continue
            raise unknown_value("unknown config key", key, keys)
        grouped[section][name] = _coerce(key, value, _section_types(SECTIONS[section])[name])
    cfg = ExperimentConfig(**{s: SECTIONS[s](**kw) for s, kw in grouped.items()})
    validate(cfg)
    return cfg


def to_flat(cfg: ExperimentConfig) -> dict[str, Any]:
    return flatten(dataclasses.asdict(cfg))


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """["attack.eps=0.1", "method.name=rslad"] -> dict; values parsed as (strict) YAML scalars.
    A key given twice or with no value is an error, not a silent last-one-wins or default."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. attack.eps=0.1")
        if key in out:
            raise ConfigError(f"--set {key} is given twice ({out[key]!r}, then {raw.strip()!r}); give each key once")
        if not raw.strip():
            raise ConfigError(
                f'--set {key}=: no value; write {key}=null for the default or {key}="" for an empty string'
            )
        out[key] = parse_yaml(raw, f"--set {key}")
    return out


def apply_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any], *, source: str) -> ExperimentConfig:
    """`base` (a file's keys) with `--set` overrides on top, validated. An error is blamed on
    `source` when `base` alone is already invalid, else on --set."""
    try:
        base_cfg = from_flat(base)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if not overrides:
        return base_cfg
    try:
        return from_flat({**base, **overrides})
    except ConfigError as exc:
        raise ConfigError(f"--set: {exc}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's keys, flat and dotted; see afm_ray.yaml_loading for what is refused."""
    loaded, _ = load_yaml_mapping(path, "config file")
    return flatten(loaded)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise unknown_value(f"{key}: unknown value", value, choices)


def _validate_teacher_choice(t: TeacherConfig) -> None:
    """teacher.checkpoint's members and teacher.select, as far as they can be checked without files."""
    members = t.members
    if len(members) > 1:
        _check(
            all(members),
            f"teacher.checkpoint: {t.checkpoint!r} has an empty member; list checkpoints separated by single commas",
        )
        _check(
            TRAIN_TEACHER not in members,
            f"teacher.checkpoint: {TRAIN_TEACHER!r} cannot be an ensemble member ({t.checkpoint!r}); train each "
            "teacher with `python -m afm_ray.teacher` and list their checkpoints",
        )
        twice = sorted({m for m in members if members.count(m) > 1})
        _check(not twice, f"teacher.checkpoint: {twice[:1]} listed twice; an ensemble member counts once")
    _check(
        re.fullmatch(r"last|best_pgd|epoch:[1-9]\d{0,8}", t.select) is not None,
        f"teacher.select: got {t.select!r}, expected one of {', '.join(TEACHER_SELECTIONS)} (N an epoch >= 1)",
    )
    n = t.select_epoch
    _check(
        n is None or not t.trained_here or n <= t.epochs,
        f"teacher.select: {t.select} but the teacher is trained for teacher.epochs={t.epochs}; "
        f"expected epoch:1 .. epoch:{t.epochs}",
    )


def validate(cfg: ExperimentConfig) -> None:
    """Range and name checks, so a bad value fails before any data, model or Ray resource."""
    _check_choice("data.name", cfg.data.name, DATASETS)
    _check(0 < cfg.data.test_fraction < 1, f"data.test_fraction: got {cfg.data.test_fraction}, expected 0 < value < 1")
    _check(
        0 <= cfg.data.image_size <= MAX_IMAGE_SIZE,
        f"data.image_size: got {cfg.data.image_size}, expected 0 (native) or a size of 1..{MAX_IMAGE_SIZE} pixels",
    )
    for section in ("student", "teacher"):
        model = getattr(cfg, section)
        _check_choice(f"{section}.arch", model.arch, MODELS)
        _check(model.width >= 0, f"{section}.width: got {model.width}, expected >= 0 (0 = architecture default)")
        _check(model.depth >= 0, f"{section}.depth: got {model.depth}, expected >= 0 (0 = architecture default)")
    _check_choice("teacher.method", cfg.teacher.method, TEACHER_METHODS)
    _check(cfg.teacher.epochs >= 1, f"teacher.epochs: got {cfg.teacher.epochs}, expected >= 1")
    _validate_teacher_choice(cfg.teacher)
    s = cfg.student
    _check_choice("student.select", s.select, STUDENT_SELECTIONS)
    _check_choice("student.average", s.average, STUDENT_AVERAGES)
    _check(
        0 < s.ema_decay < 1,
        f"student.ema_decay: got {s.ema_decay}, expected 0 < decay < 1 (0.999 is usual: the last ~1000 steps)",
    )
    _check(
        0 <= s.swa_start < 1,
        f"student.swa_start: got {s.swa_start}, expected 0 <= fraction < 1 of optim.epochs (0.75: the last quarter)",
    )
    _check_choice("method.name", cfg.method.name, METHODS)
    m = cfg.method
    _check(m.tau is None or m.tau > 0, f"method.tau: got {m.tau}, expected tau > 0")
    _check(m.alpha is None or 0 <= m.alpha <= 1, f"method.alpha: got {m.alpha}, expected 0 <= alpha <= 1")
    _check(m.beta is None or m.beta >= 0, f"method.beta: got {m.beta}, expected beta >= 0")
    _check(m.lam is None or 0 <= m.lam <= 1, f"method.lam: got {m.lam}, expected 0 <= lam <= 1")
    for name in HPARAM_NAMES:  # a hyperparameter the method does not take is an error, not silently ignored
        _check(
            getattr(m, name) is None or name in METHOD_HPARAMS[m.name],
            f"method.{name}: {m.name} has no hyperparameter {name!r} (it takes "
            f"{', '.join(METHOD_HPARAMS[m.name]) or 'none'}); leave method.{name} unset (null)",
        )
    a = cfg.attack
    _check_choice("attack.norm", a.norm, NORMS)
    _check(a.eps is None or a.eps >= 0, f"attack.eps: got {a.eps}, expected eps >= 0")
    _check(
        a.norm != "linf" or a.eps is None or a.eps <= 1,
        f"attack.eps: got {a.eps}, expected <= 1 for linf (pixels are in [0,1])",
    )
    _check(
        a.step_size is None or a.step_size > 0, f"attack.step_size: got {a.step_size}, expected > 0 (or null for eps/4)"
    )
    _check(a.steps >= 0, f"attack.steps: got {a.steps}, expected steps >= 0")
    _check_choice("attack.random_start", a.random_start, CONFIG_RANDOM_STARTS)
    try:
        parse_policy(cfg.augment.policy)
    except ConfigError as exc:
        raise ConfigError(f"augment.policy: {exc}") from None
    o = cfg.optim
    _check(o.epochs >= 1, f"optim.epochs: got {o.epochs}, expected >= 1")
    _check(o.batch_size >= 1, f"optim.batch_size: got {o.batch_size}, expected >= 1")
    _check(o.lr > 0, f"optim.lr: got {o.lr}, expected lr > 0")
    _check(0 <= o.momentum < 1, f"optim.momentum: got {o.momentum}, expected 0 <= momentum < 1")
    _check(o.weight_decay >= 0, f"optim.weight_decay: got {o.weight_decay}, expected >= 0")
    _check_choice("optim.schedule", o.schedule, LR_SCHEDULES)
    _check(
        0 <= o.warmup_epochs < o.epochs,
        f"optim.warmup_epochs: got {o.warmup_epochs}, expected 0 <= value < optim.epochs ({o.epochs})",
    )
    e = cfg.eval
    _check(e.eps is None or e.eps >= 0, f"eval.eps: got {e.eps}, expected eps >= 0")
    _check(
        a.norm != "linf" or e.eps is None or e.eps <= 1,
        f"eval.eps: got {e.eps}, expected <= 1 for linf (pixels are in [0,1]; 8/255 is the usual budget)",
    )
    _check(e.samples >= 0, f"eval.samples: got {e.samples}, expected >= 0 (0 = whole test split)")
    _check(e.val_samples >= 1, f"eval.val_samples: got {e.val_samples}, expected >= 1")
    _check(e.batch_size >= 0, f"eval.batch_size: got {e.batch_size}, expected >= 1, or 0 = chosen to fill the device")
    for attack in cfg.eval_attacks:
        _check_choice("eval.attacks", attack, ATTACKS)
    _check_choice("eval.aa_policy", e.aa_policy, AA_POLICIES)
    _check(0 <= e.aa_margin <= 1, f"eval.aa_margin: got {e.aa_margin}, expected 0 <= margin <= 1 (accuracy units)")
    _check(
        e.aa_policy != "candidates" or "aa" not in cfg.eval_attacks or "pgd20" in cfg.eval_attacks,
        f"eval.aa_policy: candidates bounds AutoAttack by PGD-20, so eval.attacks needs pgd20; got {e.attacks!r}",
    )
    r = cfg.run
    _check(r.checkpoint_every >= 0, f"run.checkpoint_every: got {r.checkpoint_every}, expected >= 0")
    _check_choice("run.amp", r.amp, AMP_SETTINGS)
    _check(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", r.device) is not None,
        f"run.device: got {r.device!r}, expected auto, cpu, cuda or cuda:N",
    )
