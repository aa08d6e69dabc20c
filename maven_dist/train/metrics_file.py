"""A JSON-lines copy of every logged step on rank 0: `tail -f`-able, and what tests compare."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsFile:
    def __init__(self, path: Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """One row per logged step with every metric written at it (training and validation rows of a step
    merge); a resumed stage re-logs steps after its checkpoint: the last value of each metric wins."""
    rows: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return [rows[k] for k in sorted(rows)]
