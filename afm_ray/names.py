"""Names shared across modules, defined once: MLflow tags, metric keys, attack vocabulary,
objectives, the evaluation protocol's wording. Standard library only, so any module (and any
tool reading MLflow) can import it without pulling torch, Ray or MLflow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# --- MLflow layout: one parent run per sweep (role "sweep"), one child run per trial ("trial"), and
# under a trial the runs that confirm it (role "confirmation", afm_ray.confirm).
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

# --- Metrics. Accuracies are fractions in [0, 1]; `eval/*` describe how they were measured.
ACCURACY_METRICS = ("clean_acc", "pgd20_acc", "cw_acc", "aa_acc")
# Each accuracy's 95% interval (afm_ray.stats): <metric>_ci_low, <metric>_ci_high.
CONFIDENCE = 0.95
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"
INTERVAL_METRICS = tuple(m + end for m in ACCURACY_METRICS for end in (CI_LOW, CI_HIGH))
# The one-value metrics every completed trial logs at its end.
FINAL_METRICS = (*ACCURACY_METRICS, *INTERVAL_METRICS, "params", "latency_ms", "eval/n_samples", "eval/eps")
# Metrics a search space may optimise (final) and those a scheduler may read every epoch.
OBJECTIVE_METRICS = (*ACCURACY_METRICS, "params", "latency_ms")
PER_EPOCH_METRICS = ("val/clean_acc", "val/pgd_acc")
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

# --- Methods, data, training switches.
HPARAM_NAMES = ("tau", "alpha", "beta", "lam")  # method.<name>; None = the method's default
DATASETS = ("digits", "mnist5k", "cifar10", "cifar100", "parquet")
TEACHER_METHODS = ("pgd_at", "trades")
# teacher.checkpoint's value that says, explicitly, "train the teacher first" (a sweep refuses "").
TRAIN_TEACHER = "train"
LR_SCHEDULES = ("cosine", "step", "constant")
AMP_SETTINGS = ("auto", "off", "bf16")


@dataclass(frozen=True)
class Objective:
    """One metric to optimise: an MLflow metric key and whether larger (max) or smaller (min) wins."""

    metric: str
    mode: str  # max | min

    @classmethod
    def parse(cls, spec: str) -> Objective:
        """``"aa_acc:max"`` -> Objective("aa_acc", "max")."""
        metric, sep, mode = spec.rpartition(":")
        if not sep or not metric or mode not in ("max", "min"):
            raise ValueError(f"bad objective {spec!r}: expected NAME:max or NAME:min (e.g. aa_acc:max clean_acc:max)")
        return cls(metric, mode)

    def __str__(self) -> str:
        return f"{self.metric}:{self.mode}"


DEFAULT_OBJECTIVES = (Objective("clean_acc", "max"), Objective("aa_acc", "max"))


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite file in the working directory (absolute URI)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
