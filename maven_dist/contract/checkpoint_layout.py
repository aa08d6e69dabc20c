"""The on-disk layout of training checkpoints: what the trainer writes and ``merge_ckpt`` reads.

Under ``{run_dir}/{stage}/checkpoints``::

    step_00000010/            a complete checkpoint
        manifest.json         step, world size, parallel layout, recipe fingerprint, git sha, versions
        model/                the HF-layout skeleton (configs, tokenizer; no weights) for merge_ckpt
        engine/               the engine's state (DeepSpeed shards, or model + optimizer)
        trainer_rank00000.pt  each rank's RNG states, loader position and counters
    step_00000010.tmp/        a save in progress (or killed): never loaded
    latest                    name of the newest complete checkpoint

and ``{run_dir}/{stage}/finished.json`` once the stage has trained to its end and exported (its recipe
fingerprint and last step): ``maven pipeline`` skips a stage that finished with the same recipe.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from maven_dist.contract.atomic_write import write_text_atomic

LATEST = "latest"
MANIFEST = "manifest.json"
SKELETON = "model"
ENGINE = "engine"
TMP_SUFFIX = ".tmp"
STEP_DIR = re.compile(r"step_(\d{8})")
FINISHED = "finished.json"


def write_finished(stage_dir: Path, fingerprint: str, step: int) -> None:
    """Mark the stage finished (atomically: a reader sees the whole file or none)."""
    write_text_atomic(
        Path(stage_dir) / FINISHED, json.dumps({"fingerprint": fingerprint, "step": step}) + "\n"
    )


def finished_fingerprint(stage_dir: Path) -> str | None:
    """The recipe fingerprint the stage finished with, or None if it has not finished."""
    path = Path(stage_dir) / FINISHED
    try:
        return json.loads(path.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def trainer_state_name(rank: int) -> str:
    return f"trainer_rank{rank:05d}.pt"


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` of a checkpoint says."""

    step: int
    world_size: int
    fingerprint: str
    stage: str
    extra: dict = field(default_factory=dict)
    """Everything else: ``layout`` ({dp, tp, pp}), ``git_sha``, ``versions``, ``loader``."""

    @property
    def layout(self) -> dict[str, int]:
        """{dp, tp, pp} of the run that saved it."""
        return self.extra["layout"]

    def to_json(self) -> str:
        core = {"step": self.step, "world_size": self.world_size, "fingerprint": self.fingerprint}
        return json.dumps(core | {"stage": self.stage} | self.extra, indent=2)

    @classmethod
    def read(cls, checkpoint: Path) -> Manifest:
        data = json.loads((Path(checkpoint) / MANIFEST).read_text())
        core = {k: data.pop(k) for k in ("step", "world_size", "fingerprint", "stage")}
        return cls(**core, extra=data)
