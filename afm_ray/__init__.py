"""afm-ray: hyperparameter sweeps of adversarial robustness distillation on Ray."""

__version__ = "0.1.0"
