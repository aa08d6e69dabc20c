"""maven_dist: distributed training of MaVEn, the multi-granularity hybrid visual encoding MLLM.

Importing the package registers MaVEn with transformers' Auto classes, so ``AutoConfig`` and
``AutoModel.from_pretrained(DIR)`` load a MaVEn directory (a stage export or a ``maven merge`` output).
The registration runs as soon as transformers is imported (now, if it already is): importing
transformers and torch takes seconds, and light entry points (the Slurm exec wrapper, ``maven --help``)
should not pay for it. Known third-party warnings are filtered once here (``maven_dist/_quiet.py``),
processes skip the interpreter's final garbage collections (``maven_dist/_exit.py``), and MLflow's usage
telemetry is off unless ``MLFLOW_DISABLE_TELEMETRY`` says otherwise.
"""

import os

from maven_dist import _exit, _quiet
from maven_dist._after_import import call_after_import

_quiet.install()
_exit.install()
# MLflow's usage telemetry (on from `import mlflow`, so set before it) adds and removes an environment
# variable from its own thread; a request the tracking sender makes meanwhile iterates os.environ and
# failed with KeyError '_MLFLOW_TELEMETRY_SESSION_ID'. Compute nodes are often offline anyway.
# MLFLOW_DISABLE_TELEMETRY=false turns it back on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _register_with_transformers() -> None:
    from maven_dist.model.generation import register_auto_classes

    register_auto_classes()


call_after_import("transformers", _register_with_transformers)
