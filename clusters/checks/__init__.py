"""The checks of clusters/check.py, one module per kind of file (see check.py's docstring)."""
