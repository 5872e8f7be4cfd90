"""The Pareto-optimal students of a sweep, read back from MLflow.

- ranking.py   eligibility, non-dominated layers, within-noise marks, the interval of each objective
- report.py    the printed table, the plot, the table file
- confirm.py   the front re-measured on more images and retrained with new seeds (Ray)
- registry.py  the front in the MLflow Model Registry (pareto-1, pareto-2, ...)

`python -m afm_ray.pareto` (__main__.py) prints, plots, confirms and registers the front.
"""
