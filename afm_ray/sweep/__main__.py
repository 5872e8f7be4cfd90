"""`python -m afm_ray.sweep`: the command lives in afm_ray.cli."""

import sys

from afm_ray.cli import sweep_main

sys.exit(sweep_main())
