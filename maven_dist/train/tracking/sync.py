"""Replay spooled tracking ops (written when the store was unreachable at the end of a process)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .ops import read_spool
from .sender import Sender

logger = logging.getLogger("maven_dist.train.tracking")


@dataclass
class SyncResult:
    files: int
    """Spool files delivered completely (and deleted)."""
    ops: int
    """Ops delivered."""
    metrics: int
    """Metric values delivered."""
    failed: list[str]
    """Spool files left in place, each with the reason."""


def sync_spool(run_dir: str | Path, uri: str | None = None) -> SyncResult:
    """Deliver every ``{run_dir}/mlflow_spool/*.jsonl`` to the store it was written for (or to ``uri``),
    in file order, deleting each file once all its ops are acknowledged. A file whose store is still
    unreachable stays for the next try."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    spool_dir = Path(run_dir) / "mlflow_spool"
    result = SyncResult(files=0, ops=0, metrics=0, failed=[])
    senders: dict[str, Sender] = {}
    for path in sorted(spool_dir.glob("*.jsonl")) if spool_dir.is_dir() else []:
        try:
            spool_uri, ops = read_spool(path)
        except (OSError, ValueError) as exc:
            result.failed.append(f"{path}: {exc}")
            continue
        target = uri or spool_uri
        sender = senders.setdefault(target, Sender(target))
        for op in ops:
            sender.put(op)
        before = sender.delivered_metrics
        if sender.deliver_pending():
            path.unlink()
            result.files += 1
            result.ops += len(ops)
            result.metrics += sender.delivered_metrics - before
        else:
            result.failed.append(f"{path}: store {target} unreachable")
            sender.stop(timeout=0)
            senders.pop(target)
    return result
