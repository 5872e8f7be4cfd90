"""The sweep: Ray Tune + Optuna over a search space, each trial a Ray Train run, MLflow tracking.

- plan.py      what a sweep resolves and checks before anything starts (no Ray)
- run.py       run_sweep: teacher, Optuna searcher, Tune, summary
- trial.py     the Tune function of one trial and its Ray Train workers
- tracking.py  MLflow: a parent run per sweep, a child run per trial
- progress.py  one line per trial event

`python -m afm_ray.sweep` runs afm_ray.cli.sweep_main.
"""
