"""Known third-party warnings, filtered once when the package is imported: each one is understood, not
actionable by a user, and would otherwise repeat on every rank (some on every step). Set
``MAVEN_SHOW_ALL_WARNINGS=1`` to see them all again.
"""

from __future__ import annotations

import logging
import os
import warnings

from maven_dist._after_import import call_after_import

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


def _quiet_deepspeed() -> None:
    logging.getLogger("DeepSpeed").addFilter(_DropKnown())


def install() -> None:
    if os.environ.get("MAVEN_SHOW_ALL_WARNINGS", "") not in ("", "0"):
        return
    for category, message, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    call_after_import("deepspeed", _quiet_deepspeed)
