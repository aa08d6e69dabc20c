"""maven_dist: distributed training of MaVEn, the multi-granularity hybrid visual encoding MLLM.

Importing the package registers MaVEn with transformers' Auto classes, so ``AutoConfig`` and
``AutoModel.from_pretrained(DIR)`` load a MaVEn directory (a stage export or a ``maven merge`` output).
The registration runs as soon as transformers is imported (now, if it already is): importing
transformers and torch takes seconds, and light entry points (the Slurm exec wrapper, ``maven --help``)
should not pay for it. Known third-party warnings are filtered once here (``maven_dist/_quiet.py``),
and processes skip the interpreter's final garbage collections (``maven_dist/_exit.py``).
"""

from maven_dist import _exit, _quiet
from maven_dist._after_import import call_after_import

_quiet.install()
_exit.install()


def _register_with_transformers() -> None:
    from maven_dist.model.generation import register_auto_classes

    register_auto_classes()


call_after_import("transformers", _register_with_transformers)
