"""Names shared across modules, defined once: MLflow tags, metric keys, attack vocabulary, the
methods, architectures and augmentation policies by name, objectives, the evaluation protocol's
wording. Standard library only (and afm_ray.errors), so any module (and any tool reading MLflow)
can import it without pulling torch, Ray or MLflow; the registries that build the real things
(afm_ray.methods.METHODS, afm_ray.models.MODELS, afm_ray.augment) are checked against these tables
by tests/test_names.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from afm_ray.errors import ConfigError

# --- MLflow layout: one parent run per sweep (role "sweep"), one child run per trial ("trial"), and
# under a trial the runs that confirm it (role "confirmation", afm_ray.pareto.confirm).
ROLE_TAG = "afm_ray.role"
TRIAL_STATUS_TAG = "afm_ray.trial_status"  # running | completed | early_stopped | failed
TRIAL_ID_TAG = "afm_ray.trial_id"  # the Tune trial id
SWEEP_TAG = "afm_ray.sweep_name"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag
MODEL_ERROR_TAG = "afm_ray.model_error"  # why a completed trial has no logged student
NODE_ID_TAG = "ray.node_id"  # the Ray node ids a trial's workers ran on, comma-separated
NODE_ID_METRIC = "ray/node_id"  # what each Train worker reports: the id of the node it runs on
AA_SKIPPED_TAG = "afm_ray.aa_skipped"  # why a trial's AutoAttack did not run (eval.aa_policy: candidates)
STUDENT_MODEL = "student"  # the artifact path / logged-model name of a trial's student
PARETO_ALIAS_PREFIX = "pareto-"  # registered front members get aliases pareto-1, pareto-2, ...
# sha256 of a logged student's spec.json (which holds the weights' sha256): kept in the tracking
# store, apart from the artifact store the files live in, so a changed artifact is refused.
STUDENT_SHA_TAG = "afm_ray.student_sha256"
SWEEP_OBJECTIVES_PARAM = "sweep.objectives"  # on the sweep's parent run: "clean_acc:max,aa_acc:max"
# A confirmation (role "confirmation", a child of its trial run): the trial's student scored again
# on more test images ("reevaluate"), or its config trained again with a new seed ("retrain").
CONFIRMS_TAG = "afm_ray.confirms"  # the trial run id it confirms
CONFIRM_KIND_TAG = "afm_ray.confirm_kind"  # reevaluate | retrain
CONFIRM_SEED_TAG = "afm_ray.confirm_seed"  # run.seed of a retrain ("" for a re-evaluation)
CONFIRM_SAMPLES_TAG = "afm_ray.confirm_samples"  # test images asked for (0 = the whole test split)
CONFIRM_KINDS = ("reevaluate", "retrain")
# A final-stage run (role "final", afm_ray.final): one configuration trained for the full schedule with one
# seed and scored by AutoAttack on the whole test split; under its trial's run when it came from one.
FINAL_OF_TAG = "afm_ray.final_of"  # the trial run id it retrains, or "recipe:<name>"
FINAL_SEED_TAG = "afm_ray.final_seed"  # its run.seed
FINAL_SAMPLES_TAG = "afm_ray.final_samples"  # test images asked for (0 = the whole test split)
FINAL_CONFIG_TAG = "afm_ray.final_config"  # sha256 prefix of its resolved config (seed aside): --set changes it

# --- Metrics. Accuracies are fractions in [0, 1]; `eval/*` describe how they were measured.
ACCURACY_METRICS = ("clean_acc", "pgd20_acc", "cw_acc", "aa_acc")
# Each accuracy's 95% interval (afm_ray.stats): <metric>_ci_low, <metric>_ci_high.
CONFIDENCE = 0.95
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"
INTERVAL_METRICS = tuple(m + end for m in ACCURACY_METRICS for end in (CI_LOW, CI_HIGH))
# Which weights are the student (student.select, student.average; afm_ray.student_weights): the epoch
# whose weights were selected, their val/pgd10_acc, and how many snapshots the average holds (0: none).
SELECTED_EPOCH_METRIC = "student/selected_epoch"
SELECTED_VAL_METRIC = "student/selected_val_pgd10_acc"
AVERAGED_METRIC = "student/averaged"
STUDENT_METRICS = (SELECTED_EPOCH_METRIC, SELECTED_VAL_METRIC, AVERAGED_METRIC)
# The one-value metrics every completed trial logs at its end.
FINAL_METRICS = (
    *ACCURACY_METRICS,
    *INTERVAL_METRICS,
    "params",
    "latency_ms",
    "eval/n_samples",
    "eval/eps",
    *STUDENT_METRICS,
)
# Metrics a search space may optimise (final) and those a scheduler may read every epoch.
OBJECTIVE_METRICS = (*ACCURACY_METRICS, "params", "latency_ms")
PER_EPOCH_METRICS = ("val/clean_acc", "val/pgd10_acc")
# 1.0 on the result that carries a trial's final evaluation. Not Tune's reserved `done`, which
# Tune also sets on the last per-epoch result of a trial its scheduler stopped early.
FINAL_RESULT_FLAG = "final_result"

# --- Attacks and the evaluation protocol (fixed, so numbers compare across trials).
NORMS = ("linf", "l2")
# How PGD starts: uniform in the ball, x + 0.001 N(0,1) (official RSLAD/AdaAD/TRADES code), or x.
RANDOM_STARTS = ("uniform", "normal", "none")
# Config values of attack.random_start: "default" = the method's own start.
CONFIG_RANDOM_STARTS = ("default", *RANDOM_STARTS)
EVAL_PROTOCOLS = {
    "clean": "clean",
    "pgd20": "PGD-20 on CE, step eps/4, uniform random start",
    "pgd10": "PGD-10 on CE, step eps/4, uniform random start",
    "cw": "CW-linf: PGD-20 on the margin loss, step eps/4",
    "aa": "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square; pyautoattack)",
}
ATTACKS = tuple(EVAL_PROTOCOLS)
# eval.aa_policy: AutoAttack on every trial, or only on trials PGD-20 cannot rule out (staged).
AA_POLICIES = ("all", "candidates")
# Final-result keys of a trial whose AutoAttack was skipped: a flag (1.0) and the reason (text).
AA_SKIPPED_METRIC = "eval/aa_skipped"
AA_SKIP_REASON_KEY = "eval/aa_skip_reason"

# --- Methods, models, augmentation, data, training switches.
# Each method's hyperparameters (config keys method.<name>), in afm_ray.methods' field order.
METHOD_HPARAMS: dict[str, tuple[str, ...]] = {
    "advfunmatch": ("tau",),
    "rslad": ("tau", "alpha"),
    "adaad": ("tau", "alpha"),
    "akd": ("lam", "tau"),
    "ard": ("tau", "alpha"),
    "funmatch": ("tau",),
    "pgd_at": (),
    "trades": ("beta",),
}
METHODS = tuple(METHOD_HPARAMS)
HPARAM_NAMES = ("tau", "alpha", "beta", "lam")  # method.<name>; None = the method's default
TEACHER_METHODS = ("pgd_at", "trades")  # adversarial training without a teacher: how teachers are trained
MODELS = ("small_cnn", "resnet18", "preact_resnet18", "wrn", "wrn34_10", "wrn28_10", "mobilenet_v2")
AUGMENT_POLICIES = ("none", "crop_flip", "autoaugment", "randaugment", "trivialaugment", "mixup", "cutmix")
MIXING_POLICIES = ("mixup", "cutmix")  # mixing ops run last, after the per-image ops
DATASETS = ("digits", "mnist5k", "cifar10", "cifar100", "parquet")
# teacher.checkpoint's value that says, explicitly, "train the teacher first" (a sweep refuses "").
TRAIN_TEACHER = "train"
LR_SCHEDULES = ("cosine", "step", "constant")
# student.select: the last epoch's weights, or the epoch with the best val/pgd10_acc (held-out split).
STUDENT_SELECTIONS = ("last", "best_pgd")
# student.average: the weights as trained, an exponential moving average per step, or SWA per epoch.
STUDENT_AVERAGES = ("none", "ema", "swa")
# teacher.select: last | best_pgd | epoch:N (afm_ray.teacher.members).
TEACHER_SELECTIONS = ("last", "best_pgd", "epoch:N")
AMP_SETTINGS = ("auto", "off", "bf16")


def needs_teacher(method: str) -> bool:
    """Whether `method` distils a teacher (every method but adversarial training itself)."""
    return method not in TEACHER_METHODS


def parse_policy(policy: str) -> tuple[str, ...]:
    """Split an augmentation policy "a+b" into its parts, mixing ops moved last, e.g. "cutmix+autoaugment"
    -> ("autoaugment", "cutmix"). "none" stands alone; unknown or repeated parts raise a ConfigError."""
    parts = tuple(p.strip().lower() for p in policy.split("+"))
    unknown = [p for p in parts if p not in AUGMENT_POLICIES]
    if unknown:
        raise ConfigError(
            f"unknown augmentation policy {', '.join(map(repr, unknown))} in {policy!r}; "
            f"valid: {', '.join(AUGMENT_POLICIES)} (combine with '+', e.g. 'autoaugment+cutmix')"
        )
    if len(set(parts)) != len(parts):
        raise ConfigError(f"augmentation policy {policy!r} repeats a part; use each of {AUGMENT_POLICIES} at most once")
    if "none" in parts and len(parts) > 1:
        raise ConfigError(f"augmentation policy {policy!r} combines 'none' with other parts; use 'none' alone")
    return tuple(p for p in parts if p not in MIXING_POLICIES) + tuple(p for p in parts if p in MIXING_POLICIES)


@dataclass(frozen=True)
class Objective:
    """One metric to optimise: an MLflow metric key and whether larger (max) or smaller (min) wins.
    Written "aa_acc:max"; a list of them "clean_acc:max,aa_acc:max" (the sweep's parent run param)."""

    metric: str
    mode: str  # max | min

    def __post_init__(self) -> None:
        if not self.metric or self.mode not in ("max", "min"):
            raise ConfigError(
                f"bad objective {self.metric!r} with mode {self.mode!r}: expected a metric name and max or min"
            )

    @classmethod
    def parse(cls, spec: str | Objective) -> Objective:
        """``"aa_acc:max"`` -> Objective("aa_acc", "max"); an Objective passes through."""
        if isinstance(spec, Objective):
            return spec
        metric, sep, mode = str(spec).rpartition(":")
        if not sep or not metric or mode not in ("max", "min"):
            raise ConfigError(f"bad objective {spec!r}: expected NAME:max or NAME:min (e.g. aa_acc:max clean_acc:max)")
        return cls(metric, mode)

    @classmethod
    def parse_all(cls, specs: str | Iterable[str | Objective]) -> tuple[Objective, ...]:
        """Objectives from "a:max,b:min" or an iterable of specs: at least one, no metric twice."""
        items = [s for s in specs.split(",") if s.strip()] if isinstance(specs, str) else list(specs)
        objectives = tuple(cls.parse(s.strip() if isinstance(s, str) else s) for s in items)
        if not objectives:
            raise ConfigError("no objectives given: expected NAME:max|min, e.g. aa_acc:max clean_acc:max")
        metrics = [o.metric for o in objectives]
        twice = sorted({m for m in metrics if metrics.count(m) > 1})
        if twice:
            raise ConfigError(f"objective metric(s) given more than once: {', '.join(twice)}")
        return objectives

    @staticmethod
    def join(objectives: Iterable[Objective]) -> str:
        """The inverse of `parse_all` on a string: "clean_acc:max,aa_acc:max"."""
        return ",".join(map(str, objectives))

    def __str__(self) -> str:
        return f"{self.metric}:{self.mode}"


DEFAULT_OBJECTIVES = (Objective("clean_acc", "max"), Objective("aa_acc", "max"))


# What --optuna-storage defaults to, as MLflow's MLFLOW_TRACKING_URI does for --tracking-uri.
OPTUNA_STORAGE_ENV = "AFM_RAY_OPTUNA_STORAGE"


def trial_completion_path(sweep_dir: str, trial_id: str) -> str:
    """Where a sweep keeps a completed trial's final result, in its storage (a resumed sweep runs it no more)."""
    return f"{sweep_dir}/completed/{trial_id}.json"


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite file in the working directory (absolute URI)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
