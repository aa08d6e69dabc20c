"""Finding the checkpoint to merge and describing its tensors as byte ranges on disk.

A *source* is one kind of engine state (single-process, ZeRO-3, 3D TP/PP). Whatever its kind,
it answers one question: for each training parameter name, its shape, dtype, whether it trained, and
the list of file byte ranges whose concatenation is the tensor in row-major order. The writer needs
nothing else, so a new kind plugs in as one more reader (``open_source``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from maven_dist.contract.checkpoint_layout import (
    ENGINE,
    LATEST,
    MANIFEST,
    SKELETON,
    STEP_DIR,
    TMP_SUFFIX,
    step_dir_name,
)
from maven_dist.merge.errors import MergeError


@dataclass(frozen=True)
class Piece:
    """`nbytes` bytes at `offset` of `path`."""

    path: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SourceTensor:
    """One training parameter: its bytes are the concatenation of `pieces`."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: Sequence[Piece]
    """A tuple, or a lazy sequence where a tensor has very many ranges (3D row-parallel slices)."""
    trainable: bool

    @property
    def nbytes(self) -> int:
        if isinstance(self.pieces, InterleavedPieces):
            return self.pieces.nbytes
        return sum(p.nbytes for p in self.pieces)


class InterleavedPieces(Sequence[Piece]):
    """Byte ranges of a tensor cut over tp ranks along one dimension, in the full tensor's row-major
    order: for each of `outer` leading index tuples ("rows"), `inner` bytes from each rank's slice in
    turn. `slices` are the ranks' contiguous slices, in rank order."""

    def __init__(self, slices: Sequence[Piece], outer: int, inner: int):
        self.slices, self.outer, self.inner = tuple(slices), outer, inner

    def __len__(self) -> int:
        return self.outer * len(self.slices)

    @property
    def nbytes(self) -> int:
        return self.outer * self.inner * len(self.slices)

    def __getitem__(self, i: int) -> Piece:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        row, rank = divmod(i, len(self.slices))
        loc = self.slices[rank]
        return Piece(loc.path, loc.offset + row * self.inner, self.inner)

    def __iter__(self) -> Iterator[Piece]:
        for row in range(self.outer):
            for loc in self.slices:
                yield Piece(loc.path, loc.offset + row * self.inner, self.inner)

    def blocks(self, max_bytes: int) -> Iterator[tuple[tuple[Piece, ...], int]]:
        """Runs of whole rows of about `max_bytes` in all (at least one row): each rank's contiguous
        bytes of the run, and the run's row count. Reading these and interleaving them row by row
        gives the same bytes as the pieces, with one read per rank instead of one per row."""
        rows = max(1, max_bytes // (self.inner * len(self.slices)))
        for first in range(0, self.outer, rows):
            n = min(rows, self.outer - first)
            yield tuple(Piece(s.path, s.offset + first * self.inner, n * self.inner) for s in self.slices), n


class CheckpointSource(Protocol):
    kind: str
    """'local' (one process), 'zero3' or 'zero3-universal' (DeepSpeed ZeRO-3), '3d' (TP x PP pipeline checkpoint)."""
    world_size: int
    knows_trainable: bool
    """Whether `SourceTensor.trainable` is known (needed by --exclude-frozen)."""

    def tensors(self) -> dict[str, SourceTensor]:
        """Every saved parameter by training name, in no particular order."""
        ...


@dataclass(frozen=True)
class CheckpointRef:
    """One complete checkpoint directory and what its manifest says."""

    path: Path
    manifest: dict = field(repr=False)

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def skeleton(self) -> Path:
        return self.path / SKELETON

    @property
    def engine_dir(self) -> Path:
        return self.path / ENGINE


def find_checkpoint(
    src: Path, stage: str | None = None, step: int | None = None, tag: str | None = None
) -> CheckpointRef:
    """Resolve SRC (a run directory, a stage directory, a ``checkpoints`` directory or one checkpoint)
    to one complete checkpoint: `tag` (a directory name such as ``step_00000010``) or `step` if given,
    else the one ``latest`` names."""
    src = Path(src)
    if not src.exists():
        raise MergeError(f"{src} does not exist")
    if step is not None and tag is not None:
        raise MergeError("give --step or --tag, not both")
    if (src / MANIFEST).is_file() or src.name.endswith(TMP_SUFFIX):
        if step is not None or tag is not None:
            raise MergeError(
                f"{src} is one checkpoint; --step/--tag choose among checkpoints of a stage or run directory"
            )
        return _complete(src)
    root = _checkpoints_root(src, stage)
    if tag is None and step is not None:
        tag = step_dir_name(step)
    if tag is None:
        pointer = root / LATEST
        if not pointer.is_file():
            raise MergeError(
                f"{root} has no '{LATEST}' file: no checkpoint was completed there (choose one with --step)"
            )
        tag = pointer.read_text().strip()
    path = root / tag
    if not path.is_dir():
        if (root / f"{tag}{TMP_SUFFIX}").is_dir():
            return _complete(root / f"{tag}{TMP_SUFFIX}")
        available = sorted(p.name for p in root.iterdir() if STEP_DIR.fullmatch(p.name))
        raise MergeError(f"{root} has no checkpoint {tag}; available: {available or 'none'}")
    return _complete(path)


def _checkpoints_root(src: Path, stage: str | None) -> Path:
    if (src / LATEST).is_file() or any(STEP_DIR.fullmatch(p.name) for p in src.iterdir()):
        return src
    if (src / "checkpoints").is_dir():
        return src / "checkpoints"
    stages = {p.parent.name: p for p in src.glob("*/checkpoints") if p.is_dir()}
    if not stages:
        raise MergeError(
            f"{src} is no run, stage or checkpoint directory: no manifest.json, 'latest' file or */checkpoints"
        )
    if stage is not None:
        if stage not in stages:
            raise MergeError(f"{src} has no stage {stage!r} with checkpoints; it has {sorted(stages)}")
        return stages[stage]
    # The run's newest checkpoint: the stage whose `latest` pointer was written last.
    with_latest = [p for p in stages.values() if (p / LATEST).is_file()]
    if not with_latest:
        raise MergeError(f"no stage of {src} has a complete checkpoint ({sorted(stages)})")
    return max(with_latest, key=lambda p: (p / LATEST).stat().st_mtime)


def _complete(path: Path) -> CheckpointRef:
    if path.name.endswith(TMP_SUFFIX) or not (path / MANIFEST).is_file():
        raise MergeError(
            f"{path} is an incomplete save (killed before its manifest was written); merge a complete "
            "checkpoint (the 'latest' file names the newest)"
        )
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise MergeError(f"{path / MANIFEST} is not valid JSON (line {e.lineno}): {e.msg}") from e
    if not (path / SKELETON / "config.json").is_file():
        raise MergeError(
            f"{path} has no {SKELETON}/config.json: it predates the HF skeleton in checkpoints; re-save it"
        )
    return CheckpointRef(path, manifest)


def open_source(ref: CheckpointRef, threads: int = 4) -> CheckpointSource:
    """Detect the engine-state kind of a checkpoint and open its reader."""
    engine = ref.engine_dir
    layout = ref.manifest.get("layout", {})
    if (
        layout.get("tp", 1) > 1
        or layout.get("pp", 1) > 1
        or any(engine.glob("*/layer_*-model_*-model_states.pt"))
    ):
        from maven_dist.merge.three_d_source import ThreeDSource

        return ThreeDSource(ref, threads=threads)
    if (engine / "model.safetensors").is_file():
        from maven_dist.merge.local_source import LocalSource

        return LocalSource(ref)
    if any(engine.glob("*/zero_pp_rank_*_mp_rank_*_states.pt")):
        from maven_dist.merge.zero3_source import Zero3Source

        return Zero3Source(ref, threads=threads)
    raise MergeError(
        f"{engine} holds no engine state this tool knows (model.safetensors or DeepSpeed ZeRO files)"
    )
