"""The fixed evaluation protocol (clean, PGD-20, CW, AutoAttack) and its metric keys.

- protocol.py  `evaluate_model`, `evaluate_checkpoint`, the sharded final evaluation of a trial

`python -m afm_ray.evaluate` (__main__.py) evaluates a checkpoint.
"""
