"""MLflow: how a sweep's runs are written and read back.

- mlflow_runs.py    a client per URI, paged searches, quoting, the trial runs of an experiment
- trial_tracker.py  the sweep's writer: a parent run per sweep, a child run per trial (a Tune callback)
- student_model.py  a student as safetensors + a JSON spec inside an MLflow model; fetched without unpickling
"""
