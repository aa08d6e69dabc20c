"""Tracking operations: the unit the background sender delivers, buffers and spills to disk.

An :class:`Op` names its run *logically* (experiment, launch id, stage), never by MLflow run id, so an
op buffered while the store was unreachable, or spilled to a spool file and replayed by another process
(or into another store with ``sync --uri``), still lands in the right run: the sender resolves the run
by its tags when it delivers. Every op is idempotent when delivered twice (metrics dedupe on
key/step/timestamp/value in MLflow's stores, params with the same value are no-ops, runs are found by
tag before they are created), which is what makes at-least-once delivery safe.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

OpKind = Literal[
    "open_stage", "metrics", "params", "tags", "artifact", "loss_curve", "end_stage", "spool_done"
]

SPOOL_FORMAT = "maven_dist.tracking.spool/1"


@dataclass
class Op:
    kind: OpKind
    """What to do; see :class:`maven_dist.train.tracking.sender.Sender` for each kind's payload."""
    experiment: str = ""
    """Experiment name the run lives in."""
    launch_id: str = ""
    """The launch (parent run) this op belongs to."""
    stage: str = ""
    """The stage (nested run) this op belongs to; empty for launch-level ops."""
    payload: dict[str, Any] = field(default_factory=dict)
    """Kind-specific, JSON-serialisable data."""

    @property
    def num_metrics(self) -> int:
        return len(self.payload.get("metrics", ())) if self.kind == "metrics" else 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Op:
        return cls(**json.loads(line))


def write_spool(path: Path, uri: str, ops: list[Op]) -> None:
    """Write ops to a spool file atomically (temp file, fsync, rename); the header names the store URI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps({"format": SPOOL_FORMAT, "uri": uri, "created": time.time()}) + "\n")
        for op in ops:
            f.write(op.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_spool(path: Path) -> tuple[str, list[Op]]:
    """Read a spool file; returns (tracking URI it was meant for, ops in order)."""
    with path.open() as f:
        lines = f.read().splitlines()
    if not lines:
        raise ValueError(f"spool file {path} is empty; delete it")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"spool file {path} line 1: not a JSON header ({exc}); delete or repair the file"
        ) from exc
    if header.get("format") != SPOOL_FORMAT:
        raise ValueError(
            f"spool file {path} line 1: format {header.get('format')!r}, expected {SPOOL_FORMAT!r}"
        )
    ops = []
    for lineno, line in enumerate(lines[1:], start=2):
        try:
            ops.append(Op.from_json(line))
        except (json.JSONDecodeError, TypeError) as exc:
            # A torn last line (crash mid-write cannot happen with the atomic rename, but a
            # hand-edited file can) is reported with its place rather than silently dropped.
            raise ValueError(f"spool file {path} line {lineno}: not a tracking op ({exc})") from exc
    return header["uri"], ops
