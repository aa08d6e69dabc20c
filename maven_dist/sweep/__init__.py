"""``maven sweep SWEEP.yaml``: ablation arms of a recipe, run locally or as a Slurm job array, compared in
one MLflow store (spec.py: the file; runner.py: the jobs; slurm.py: submitit; report.py: the comparison)."""
