"""One distillation run: the plain training loop a Ray Train worker (or a plain process) runs.

- loop.py      `TrainStep`, `train_fn_per_worker`, the reporters (plain process or Ray Train)

`python -m afm_ray.train` (__main__.py) trains one student (and its teacher when needed).
"""
