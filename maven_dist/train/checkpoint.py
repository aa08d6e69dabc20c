"""Checkpointing: one component, built once with everything stateful, called through two methods.

    manager = CheckpointManager(cfg, env, engine, loader, state, skeleton)
    manager.load_latest()            # at start: resume from the newest complete checkpoint, if any
    manager.maybe_save(step)         # every step: saves every `checkpoint.every_steps` (or `force=True`)

The layout on disk is ``maven_dist/contract/checkpoint_layout.py``'s (shared with ``merge_ckpt``). A save
is written to ``step_N.tmp`` and renamed only after every rank has finished and the manifest is on
disk, and ``latest`` is replaced atomically after that: a save killed at any point leaves a ``.tmp``
directory that is never loaded (and is removed at the next start). Whether a checkpoint of another
layout can be loaded (and how: ZeRO-3 reshards through DeepSpeed's universal format) is the engine's
decision, in ``Engine.load``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from maven_dist.config import Config
from maven_dist.contract import checkpoint_layout as layout
from maven_dist.contract.atomic_write import write_text_atomic
from maven_dist.contract.checkpoint_layout import Manifest
from maven_dist.parallel.distributed import DistEnv, barrier, print0
from maven_dist.parallel.engine import Engine


class CheckpointMismatch(RuntimeError):
    """The latest checkpoint was written by a different recipe."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class CheckpointManager:
    """Saves and restores the engine, the loader position, the trainer state and every rank's RNG."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        engine: Engine,
        loader: Stateful,
        trainer_state: Stateful,
        skeleton: Path,
        allow_recipe_change: bool = False,
        manifest_extra: dict | None = None,
    ):
        self.root = cfg.stage_dir / "checkpoints"
        self.every_steps, self.keep_last = cfg.checkpoint.every_steps, cfg.checkpoint.keep_last
        self.resume = cfg.checkpoint.resume
        self.fingerprint, self.stage = cfg.fingerprint(), cfg.stage.name
        self.env, self.engine, self.loader, self.trainer_state = env, engine, loader, trainer_state
        self.skeleton = skeleton
        self.allow_recipe_change = allow_recipe_change
        self.manifest_extra = manifest_extra or {}
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*" + layout.TMP_SUFFIX):
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    # ------------------------------------------------------------------ save

    def maybe_save(self, step: int, force: bool = False) -> Path | None:
        """Save at `step` when it is a multiple of ``checkpoint.every_steps`` or `force`; the directory or None."""
        if not force and step % self.every_steps:
            return None
        return self._save(step)

    def _save(self, step: int) -> Path:
        final = self.root / layout.step_dir_name(step)
        tmp = final.with_name(final.name + layout.TMP_SUFFIX)
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / layout.ENGINE).mkdir(parents=True)
        barrier()
        self.engine.save(tmp / layout.ENGINE)
        loader_state = self.loader.state_dict()
        rank_state = _to_plain(
            {"rng": capture_rng_state(), "trainer": self.trainer_state.state_dict(), "loader": loader_state}
        )
        torch.save(rank_state, tmp / layout.trainer_state_name(self.env.rank))
        barrier()
        if self.env.is_main:
            shutil.copytree(self.skeleton, tmp / layout.SKELETON)
            extra = self.manifest_extra | {"loader": loader_state}
            manifest = Manifest(step, self.env.world_size, self.fingerprint, self.stage, extra)
            write_text_atomic(tmp / layout.MANIFEST, manifest.to_json())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text_atomic(self.root / layout.LATEST, final.name)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.root.iterdir() if layout.STEP_DIR.fullmatch(p.name))
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / layout.LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / layout.MANIFEST).is_file() else None

    def load_latest(self) -> Manifest | None:
        """Resume from the newest complete checkpoint (when ``checkpoint.resume``); its manifest, or None.

        Refuses a checkpoint written by another recipe unless ``allow_recipe_change``. After a change of
        world size every rank takes rank 0's trainer state and data position (the loader re-splits it)
        and keeps its fresh RNG: ranks that did not exist have no RNG state to restore."""
        path = self.latest() if self.resume else None
        if path is None:
            return None
        saved = Manifest.read(path)
        if saved.fingerprint != self.fingerprint and not self.allow_recipe_change:
            raise CheckpointMismatch(
                f"refusing to resume from {path}: it was written by a different recipe (fingerprint "
                f"{saved.fingerprint}, now {self.fingerprint}). Use a new run_dir, restore the recipe, or pass "
                "--force to resume anyway."
            )
        self.engine.load(path / layout.ENGINE, saved)
        same_world = saved.world_size == self.env.world_size
        rank = self.env.rank if same_world else 0
        state = torch.load(path / layout.trainer_state_name(rank), map_location="cpu", weights_only=True)
        if same_world:
            restore_rng_state(_rng_from_plain(state["rng"]))
        self.trainer_state.load_state_dict(state["trainer"])
        self.loader.load_state_dict(state["loader"])
        resharded = (
            "" if same_world else f", resharded from {saved.world_size} to {self.env.world_size} ranks"
        )
        print0(f"[{self.stage}] resumed from {path} at step {saved.step}{resharded}")
        return saved


# ---------------------------------------------------------------------- RNG and files


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
