"""Processes end without CPython's final garbage collections.

A stage or eval process holds ~700k objects (torch, transformers, DeepSpeed, MLflow). When it exits,
CPython's finalisation walks all of them in several full collections: 4.4 s of one core per process on
a 2-core machine, paid by every rank of every stage and every tool run (measured with py-spy: the
exiting process sits in ``gc_collect_main``). An atexit handler registered when the package is imported
runs after the handlers registered later (MLflow's, ``weakref.finalize``'s, multiprocessing's), so by
then everything a process writes is closed; freezing moves the live objects out of the collector's
reach, finalisation frees what reference counting frees, and the process exits in a fraction of a
second. It only ever runs at interpreter exit, so importing the package changes nothing before that.
"""

from __future__ import annotations

import atexit
import gc


def install() -> None:
    atexit.register(gc.freeze)
