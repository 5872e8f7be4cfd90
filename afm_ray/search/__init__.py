"""What a sweep tries, and the rules that decide what it spends: no Ray here.

- space.py      YAML search spaces, validated; the Optuna define-by-run function
- samplers.py   the space's sampler (tpe, nsga2, random, grid) as an Optuna sampler
- mo_asha.py    multi-objective successive halving: rungs and the promote-or-stop rule
- staged_aa.py  staged evaluation: may a trial's AutoAttack still matter, given its PGD-20
"""
