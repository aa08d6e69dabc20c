"""What every maven process sets up before it works, called first by its entry point (``maven``'s main, the
stage entry ``python -m maven_dist.train``, ``maven pipeline``), never by importing the package.

* **Known third-party warnings are filtered.** Each one is understood, not actionable by a user, and would
  otherwise repeat on every rank (some on every step). ``MAVEN_SHOW_ALL_WARNINGS=1`` shows them all again.
* **The process ends without CPython's final garbage collections.** A stage or eval process holds ~700k
  objects (torch, transformers, DeepSpeed, MLflow); finalisation walks them in several full collections:
  4.4 s of one core per process on a 2-core machine, paid by every rank of every stage and every tool run
  (measured with py-spy: the exiting process sits in ``gc_collect_main``). ``gc.freeze`` at exit moves the
  live objects out of the collector's reach; what reference counting frees is still freed. Registered
  before the heavy imports, it runs after their exit handlers (atexit is last in, first out).
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import warnings

# (category, message regex, why it is safe to hide)
KNOWN_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
     "DeepSpeed's ZeRO-3 collectives call the old names on every step; the calls are correct"),
    (UserWarning, r"Transformer Engine and Apex are not installed",
     "megatron-core's fused kernels; the 3D backend uses its plain torch fallbacks on purpose"),
)  # fmt: skip

# DeepSpeed logs this once per process for MavenModel's ModelOutput: its tensors are reached through the
# loss, and the ZeRO-3 parity tests prove the gathers and releases right, so the hooks it worries about do.
DEEPSPEED_MESSAGES = ("A module has unknown inputs or outputs type",)


class _DropKnown(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(m in record.getMessage() for m in DEEPSPEED_MESSAGES)


def prepare_process() -> None:
    """Filter the known warnings and freeze the heap at exit; idempotent."""
    if getattr(prepare_process, "done", False):
        return
    prepare_process.done = True  # type: ignore[attr-defined]
    atexit.register(gc.freeze)
    if os.environ.get("MAVEN_SHOW_ALL_WARNINGS", "") not in ("", "0"):
        return
    for category, message, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # DeepSpeed's logger (deepspeed.utils.logging) is logging.getLogger("DeepSpeed"): the filter waits on it.
    logging.getLogger("DeepSpeed").addFilter(_DropKnown())
