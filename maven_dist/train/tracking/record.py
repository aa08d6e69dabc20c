"""A run's durable record on rank 0's disk (its files: docs/experiments.md, "How a run reaches MLflow"):
everything MLflow is told, written before it is told. Each write is done when the call returns (``run.json``
replaced atomically), so a killed process has lost nothing it logged."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maven_dist.contract.atomic_write import write_json_atomic
from maven_dist.train.metrics_file import drop_torn_line

from .run_info import PARAM_LIMIT, TAG_LIMIT, clip


class RunRecord:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.metrics, self.artifacts = self.dir / "metrics.jsonl", self.dir / "tracking/artifacts"
        self.run_file, self.synced_file = self.dir / "tracking/run.json", self.dir / "tracking/synced.json"
        self.data: dict[str, Any] = json.loads(self.run_file.read_text()) if self.run_file.is_file() else {}

    def open_attempt(self, uri: str | None, identity: dict[str, str], parent_tags: Mapping[str, str],
                     params: Mapping[str, Any], tags: Mapping[str, Any]) -> None:  # fmt: skip
        """A new attempt of the run ``identity`` (experiment, launch_id, stage) names: the same run again if
        the record is of it (a resumed stage continues its curves), else a fresh record; an older launch's
        lines stay in ``metrics.jsonl`` but are not sent (``metrics_from``). Params keep their first value
        (MLflow's are immutable); a change is the tag ``maven.param_changed.<key>`` = ``old -> new``."""
        drop_torn_line(self.metrics)
        if any(self.data.get(k) != v for k, v in identity.items()):
            shutil.rmtree(self.dir / "tracking", ignore_errors=True)
            start = self.metrics.stat().st_size if self.metrics.is_file() else 0
            self.data = identity | {"params": {}, "tags": {}, "attempts": [], "metrics_from": start}
            self.data["parent_tags"] = clip(parent_tags, TAG_LIMIT)
        old, new = self.data["params"], clip(params, PARAM_LIMIT)
        changed = {
            f"maven.param_changed.{k}": f"{old[k]} -> {v}" for k, v in new.items() if old.get(k, v) != v
        }
        self.data["uri"], self.data["params"] = uri, new | old
        self.data["tags"] |= clip({**tags, **changed}, TAG_LIMIT)
        self.data["attempts"].append(
            {"start_ms": int(time.time() * 1000), "end_ms": None, "status": "RUNNING"}
        )
        self.save()

    def end_attempt(self, status: str) -> None:
        self.data["attempts"][-1] |= {"end_ms": int(time.time() * 1000), "status": status}
        self.save()

    def save(self) -> None:
        write_json_atomic(self.run_file, self.data)


def find_records(root: str | Path) -> list[RunRecord]:
    """Every record in ``root`` or up to three levels under it (a stage, an evaluation in ``eval/<model>``, a
    sweep's ``<arm>/<stage>``), in the order they began; a run directory's data is not walked."""
    patterns = ["*/" * depth + "tracking/run.json" for depth in range(4)]
    records = [RunRecord(p.parent.parent) for pattern in patterns for p in Path(root).glob(pattern)]
    return sorted(records, key=lambda r: r.data["attempts"][0]["start_ms"])
