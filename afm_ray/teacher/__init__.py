"""The robust teacher a distillation needs.

- training.py  train one (PGD-AT or TRADES) or reuse it from the cache, keyed by its config

`python -m afm_ray.teacher` (__main__.py) trains (or reuses) the teacher a config needs.
"""
