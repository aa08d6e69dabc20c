"""The tracker interface the trainer codes against, and the tracker every rank but 0 gets."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


class Tracker(Protocol):
    """Experiment tracking as the trainer sees it. No method raises because the tracking store is
    unreachable, and none waits on it except :meth:`end_stage`, :meth:`flush` and :meth:`close`
    (bounded by ``tracking.flush_timeout_s``)."""

    def start_stage(
        self, stage_name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None
    ) -> None:
        """Open (or, on resume, reopen) this stage's run, nested under the launch's parent run."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer numeric metrics at ``step``; they are sent in batches from a background thread."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Add params to the stage run (flattened strings; a changed value is kept as a tag)."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags on the stage run."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Attach a local file to the stage run (copied now, uploaded in the background)."""

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        """Attach a mapping as YAML (``.yaml``/``.yml`` names) or JSON (anything else)."""

    def log_text(self, text: str, name: str) -> None:
        """Attach a text file."""

    def end_stage(self, status: RunStatus = "FINISHED") -> None:
        """Attach the loss-curve PNG, close the stage run with ``status`` and flush (bounded wait)."""

    def flush(self, timeout: float | None = None) -> bool:
        """Try to deliver everything now; True when nothing is left buffered."""

    def close(self) -> None:
        """Flush, stop background threads, and spill anything undelivered to the run directory's spool."""


class NullTracker:
    """The tracker of every rank except 0, and of runs with ``tracking.enabled: false``: does nothing."""

    def start_stage(
        self, stage_name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None
    ) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def end_stage(self, status: RunStatus = "FINISHED") -> None:
        pass

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        pass
