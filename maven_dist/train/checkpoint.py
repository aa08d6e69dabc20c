"""Checkpointing: one component with a narrow interface, ``save(step)`` and ``load(step=latest)``.

Layout under ``{run_dir}/{stage}/checkpoints``::

    step_00000010/            a complete checkpoint
        manifest.json         step, world size, layout, recipe fingerprint, git sha, versions
        model/                the HF-layout skeleton (configs, tokenizer; no weights) for merge_ckpt
        engine/               the engine's state (DeepSpeed shards, or model + optimizer)
        trainer_rank00000.pt  each rank's RNG states, loader position and counters
    latest                    name of the newest complete checkpoint

A save is written to ``step_N.tmp`` and renamed only after every rank has finished and the
manifest is on disk, and ``latest`` is replaced atomically after that: a save killed at any point
leaves a ``.tmp`` directory that is never loaded (and is removed at the next start).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from maven_dist.parallel.distributed import DistEnv, barrier
from maven_dist.train.engine import Engine

LATEST = "latest"
MANIFEST = "manifest.json"


class CheckpointMismatch(RuntimeError):
    """The latest checkpoint was written by a different recipe or layout."""


@dataclass(frozen=True)
class Manifest:
    step: int
    world_size: int
    fingerprint: str
    stage: str
    extra: dict

    def to_json(self) -> str:
        return json.dumps(
            {
                "step": self.step,
                "world_size": self.world_size,
                "fingerprint": self.fingerprint,
                "stage": self.stage,
            }
            | self.extra,
            indent=2,
        )

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        data = json.loads((directory / MANIFEST).read_text())
        core = {k: data.pop(k) for k in ("step", "world_size", "fingerprint", "stage")}
        return cls(**core, extra=data)


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_plain(obj):
    """Python's and numpy's RNG states hold tuples and arrays; store them as lists and tensors so the
    file loads with ``weights_only=True``."""
    if isinstance(obj, tuple | list):
        return [_to_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    return obj


def _rng_from_plain(state: dict) -> dict:
    python = state["python"]
    numpy = state["numpy"]
    return state | {
        "python": (python[0], tuple(python[1]), python[2]),
        "numpy": (numpy[0], numpy[1].numpy(), numpy[2], numpy[3], numpy[4]),
    }


class Checkpointer:
    def __init__(
        self,
        root: Path,
        env: DistEnv,
        keep_last: int,
        fingerprint: str,
        stage: str,
        skeleton: Path | None = None,
    ):
        self.root = Path(root)
        self.skeleton = skeleton
        self.env = env
        self.keep_last = keep_last
        self.fingerprint = fingerprint
        self.stage = stage
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    # ------------------------------------------------------------------ save

    def save(self, step: int, engine: Engine, trainer_state: dict, extra: dict) -> Path:
        """Write full state of every rank for `step`; returns the final directory."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "engine").mkdir(parents=True)
        barrier()
        engine.save_state(tmp / "engine")
        rank_state = _to_plain({"rng": capture_rng_state(), **trainer_state})
        torch.save(rank_state, tmp / f"trainer_rank{self.env.rank:05d}.pt")
        barrier()
        if self.env.is_main:
            if self.skeleton is not None:
                shutil.copytree(self.skeleton, tmp / "model")
            manifest = Manifest(step, self.env.world_size, self.fingerprint, self.stage, extra)
            _write_atomic(tmp / MANIFEST, manifest.to_json())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.root / LATEST, final.name)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if not p.name.endswith(".tmp"))
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / MANIFEST).is_file() else None

    def check(self, path: Path, force: bool) -> Manifest:
        """Refuse a checkpoint written by another recipe (unless `force`) or by an engine that cannot
        be converted into this run's. Another number of ZeRO-3 ranks is fine: see ``needs_reshard``."""
        manifest = Manifest.read(path)
        if manifest.fingerprint != self.fingerprint and not force:
            raise CheckpointMismatch(
                f"refusing to resume from {path}: it was written by a different recipe (fingerprint "
                f"{manifest.fingerprint}, now {self.fingerprint}). Use a new run_dir, restore the recipe, or pass "
                "--force to resume anyway."
            )
        if manifest.world_size != self.env.world_size and 1 in (manifest.world_size, self.env.world_size):
            raise CheckpointMismatch(
                f"refusing to resume from {path}: it was written by {manifest.world_size} rank(s), this run has "
                f"{self.env.world_size}. One process uses the plain PyTorch engine and more use ZeRO-3, whose "
                "states do not convert into each other; resume with the original number of processes, or start "
                f"a new stage from its export (stage.init_from)."
            )
        return manifest

    def needs_reshard(self, manifest: Manifest) -> bool:
        """A ZeRO-3 checkpoint from another number of ranks: load it as a DeepSpeed universal checkpoint."""
        return manifest.world_size != self.env.world_size

    def load(self, path: Path, engine: Engine) -> dict:
        """Restore engine state and this rank's RNG; return this rank's trainer state.

        After a change of world size, every rank takes rank 0's step and data position (the loader
        re-splits it) and keeps its fresh RNG: ranks that did not exist have no RNG state to restore."""
        engine.load_state(path / "engine")
        manifest = Manifest.read(path)
        same_world = manifest.world_size == self.env.world_size
        rank = self.env.rank if same_world else 0
        state = torch.load(path / f"trainer_rank{rank:05d}.pt", map_location="cpu", weights_only=True)
        rng = state.pop("rng")
        if same_world:
            restore_rng_state(_rng_from_plain(rng))
        return state


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".writing")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
