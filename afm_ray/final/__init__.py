"""The final stage: chosen configurations (a sweep's front, named trials, or a shipped recipe) trained for
the full schedule with several seeds, each student scored on the whole test split with standard
AutoAttack (resumable), next to the published number. `python -m afm_ray.final` is the command."""
