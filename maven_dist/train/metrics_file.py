"""``metrics.jsonl``: every metric rank 0 logged, one JSON line per log call, ``tail -f``-able.

Each line is ``{"step": N, "time_ms": T, key: value, ...}``, appended and flushed when the trainer logs,
so a process killed at any point loses nothing it logged. It is the durable record MLflow is synced from
(:mod:`maven_dist.train.tracking.sync`), and what tests compare.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path


def append_metrics(path: Path, step: int, metrics: Mapping[str, float]) -> None:
    """Append one line: ``metrics`` at ``step``, stamped with the time they were logged (ms)."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "time_ms": int(time.time() * 1000), **metrics}) + "\n")


def drop_torn_line(path: Path) -> None:
    """Cut a last line without its newline (a process killed mid-write), so that the next append starts
    a line of its own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            os.fsync(f.fileno())


def iter_lines(path: Path, offset: int = 0) -> Iterator[tuple[dict, int]]:
    """``(row, offset after it)`` for every whole line from byte ``offset`` on (none if there is no file)."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):
                return  # being written (or torn): not part of the record yet
            offset += len(line)
            yield json.loads(line), offset


def read_metrics(path: Path, offset: int = 0) -> list[dict]:
    """One row per logged step with every metric written at it (training and validation rows of a step
    merge); a resumed stage re-logs steps after its checkpoint: the last value of each metric wins."""
    rows: dict[int, dict] = {}
    for row, _ in iter_lines(Path(path), offset):  # none if there is no file
        rows.setdefault(row["step"], {}).update(row)
    return [rows[k] for k in sorted(rows)]
