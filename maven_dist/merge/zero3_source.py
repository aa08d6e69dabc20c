"""Reader for DeepSpeed ZeRO-3 engine state (``engine/<tag>/zero_pp_rank_R_mp_rank_00_*.pt``).

File format (DeepSpeed 0.19, the same one ``zero_to_fp32`` reads):

* ``*_optim_states.pt`` of rank R: ``optimizer_state_dict.fp32_flat_groups``, one flat fp32 tensor per
  parameter group. Trainable parameters are laid out in ``param_shapes`` order (groups concatenated);
  each owns ``ceil(numel / world_size)`` elements in every rank's flat groups: rank R holds elements
  ``[R * n, (R + 1) * n)`` of the flattened parameter, the last rank zero-padded.
* ``*_model_states.pt`` of rank R: ``param_shapes``, ``frozen_param_shapes`` and rank R's
  ``frozen_param_fragments`` (frozen parameters, partitioned the same way, in the model's dtype),
  persistent buffers (full) and bookkeeping (``global_steps``, ``dp_world_size``, ``ds_version``).

Only the pickles are loaded; the Adam moments, which make up two thirds of the optimizer files, are
never read.

A DeepSpeed *universal* checkpoint (``ds_to_universal``; ``maven_dist.parallel.zero3`` writes one to
``engine/universal`` to resume on another number of ranks) keeps the model-states files and replaces
the flat groups by one full tensor per trainable parameter, ``zero/<name>/fp32.pt``. Where both exist
the original tag is read; a universal directory alone is read the same way.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from maven_dist.merge.errors import MergeError
from maven_dist.merge.source import CheckpointRef, Piece, SourceTensor
from maven_dist.merge.torch_files import TorchFileIndex

_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt")


class Zero3Source:
    kind = "zero3"
    knows_trainable = True  # trained parameters are exactly those with fp32 master weights

    def __init__(self, ref: CheckpointRef, threads: int = 4):
        self.ref = ref
        self.tag_dir, self.universal = _tag_dir(ref.engine_dir)
        if self.universal:
            self.kind = "zero3-universal"
        files = _rank_files(self.tag_dir)
        expected = int(ref.manifest.get("world_size", 0)) or max(r for r, _ in files) + 1
        self.world_size = expected
        kinds = ("model",) if self.universal else ("model", "optim")
        _check_rank_files(self.tag_dir, files, expected, kinds)
        order = [(r, kind) for r in range(expected) for kind in kinds]
        with ThreadPoolExecutor(max(1, threads)) as pool:
            indexes = dict(zip(order, pool.map(lambda key: TorchFileIndex(files[key]), order), strict=True))
        self.model = [indexes[(r, "model")] for r in range(expected)]
        self.optim = [] if self.universal else [indexes[(r, "optim")] for r in range(expected)]
        self._check_consistent()

    # ------------------------------------------------------------------ checks

    def _check_consistent(self) -> None:
        first = self.model[0]
        head = first.obj
        for index in self.model:
            state = index.obj
            if not isinstance(state, dict) or "param_shapes" not in state:
                raise MergeError(f"{index.path} is not a DeepSpeed model-states file (no param_shapes)")
            if state.get("dp_world_size", self.world_size) != self.world_size:
                raise MergeError(
                    f"{index.path} was saved by a run of {state['dp_world_size']} ranks, but the checkpoint "
                    f"({self.ref.path / 'manifest.json'}) and its files say {self.world_size}"
                )
            for key in ("global_steps", "ds_version"):
                if state.get(key) != head.get(key):
                    raise MergeError(
                        f"mixed checkpoints in {self.tag_dir}: {index.path.name} has {key}={state.get(key)!r} but "
                        f"{first.path.name} has {head.get(key)!r}; every rank file must come from the same save"
                    )
            if _shape_lists(state) != _shape_lists(head):
                raise MergeError(
                    f"mixed checkpoints in {self.tag_dir}: {index.path.name} lists other parameters than {first.path.name}"
                )
        for index in self.optim:
            osd = index.obj.get("optimizer_state_dict", {}) if isinstance(index.obj, dict) else {}
            if "fp32_flat_groups" not in osd:
                raise MergeError(
                    f"{index.path} is not a DeepSpeed ZeRO-3 optimizer-states file (no fp32_flat_groups)"
                )
            stage = osd.get("zero_stage")
            stage = stage.args[0] if hasattr(stage, "args") else stage
            if stage != 3:
                raise MergeError(
                    f"{index.path} is a ZeRO stage {stage} checkpoint; this reader handles stage 3"
                )
            count = osd.get("partition_count")
            count = max(count) if isinstance(count, list) else count
            if count != self.world_size:
                raise MergeError(
                    f"{index.path} was partitioned over {count} ranks, but {self.world_size} rank files are "
                    "expected: the files come from runs of different sizes"
                )
        if head.get("shared_params"):
            raise MergeError(
                f"{first.path} has shared (tied) parameters {list(head['shared_params'])}: MaVEn has none"
            )

    # ------------------------------------------------------------------ tensors

    def tensors(self) -> dict[str, SourceTensor]:
        out: dict[str, SourceTensor] = {}
        head = self.model[0].obj
        for name in head.get("buffer_names", []):
            tensor = head["module"][name]
            loc = self.model[0].locate(tensor)
            out[name] = SourceTensor(
                name, tuple(tensor.shape), tensor.dtype, (Piece(loc.path, loc.offset, loc.nbytes),), False
            )
        for name, shape in (head.get("frozen_param_shapes") or {}).items():
            out[name] = frozen_tensor(self.model, name, tuple(shape))
        out |= self._trainable()
        return out

    def _trainable(self) -> dict[str, SourceTensor]:
        if self.universal:
            return self._trainable_from_universal()
        groups = [index.obj["optimizer_state_dict"]["fp32_flat_groups"] for index in self.optim]
        locations = [
            [index.locate(g) for g in rank_groups]
            for index, rank_groups in zip(self.optim, groups, strict=True)
        ]
        sizes = [g.numel() for g in groups[0]]
        for index, rank_groups in zip(self.optim, groups, strict=True):
            if [g.numel() for g in rank_groups] != sizes:
                raise MergeError(
                    f"{index.path}: flat group sizes {[g.numel() for g in rank_groups]} differ from rank 0's {sizes}"
                )
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        shapes = {k: tuple(v) for group in self.model[0].obj["param_shapes"] for k, v in group.items()}
        out = {}
        offset = 0
        itemsize = 4  # fp32 master weights
        for name, shape in shapes.items():
            numel = math.prod(shape)
            per_rank = math.ceil(numel / self.world_size)
            pieces = []
            for rank in range(self.world_size):
                take = max(0, min(per_rank, numel - rank * per_rank))
                pieces += _flat_range(locations[rank], starts, offset, take, itemsize, self.optim[rank].path)
            out[name] = SourceTensor(name, shape, locations[0][0].dtype, tuple(pieces), True)
            offset += per_rank
        if offset != starts[-1]:
            raise MergeError(
                f"{self.tag_dir}: the parameters need {offset} elements per rank but the flat groups hold "
                f"{starts[-1]}; the optimizer files do not match the model-states files"
            )
        return out

    def _trainable_from_universal(self) -> dict[str, SourceTensor]:
        shapes = {k: tuple(v) for group in self.model[0].obj["param_shapes"] for k, v in group.items()}
        out = {}
        for name, shape in shapes.items():
            path = self.tag_dir / "zero" / name / "fp32.pt"
            index = TorchFileIndex(path)
            tensor = index.obj if not isinstance(index.obj, dict) else index.obj.get("param")
            # ds_to_universal stores ZeRO-3 parameters flattened; row-major order makes that the same bytes.
            if tensor is None or tensor.numel() != math.prod(shape):
                raise MergeError(
                    f"{path} holds {getattr(tensor, 'shape', None)}, expected the {math.prod(shape)} elements of {name} {shape}"
                )
            loc = index.locate(tensor)
            out[name] = SourceTensor(name, shape, loc.dtype, (Piece(loc.path, loc.offset, loc.nbytes),), True)
        return out


def frozen_tensor(model_states: list[TorchFileIndex], name: str, shape: tuple[int, ...]) -> SourceTensor:
    """A frozen parameter from every rank's fragment (partitioned like the trainable ones)."""
    world_size = len(model_states)
    numel = math.prod(shape)
    per_rank = math.ceil(numel / world_size)
    pieces = []
    dtype = None
    for rank, index in enumerate(model_states):
        fragment = index.obj["frozen_param_fragments"].get(name)
        if fragment is None:
            raise MergeError(f"{index.path} lacks the frozen fragment of {name}")
        loc = index.locate(fragment)
        dtype = loc.dtype
        take = max(0, min(per_rank, numel - rank * per_rank)) * fragment.element_size()
        if loc.nbytes < take:
            raise MergeError(f"{index.path}: frozen fragment of {name} has {loc.nbytes} bytes, needs {take}")
        if take:
            pieces.append(Piece(loc.path, loc.offset, take))
    return SourceTensor(name, shape, dtype, tuple(pieces), False)


def _flat_range(locs, starts: list[int], offset: int, numel: int, itemsize: int, path: Path) -> list[Piece]:
    """Byte ranges of elements [offset, offset + numel) of one rank's concatenated flat groups."""
    pieces = []
    end = offset + numel
    for g, loc in enumerate(locs):
        lo, hi = max(offset, starts[g]), min(end, starts[g + 1])
        if lo < hi:
            pieces.append(Piece(loc.path, loc.offset + (lo - starts[g]) * itemsize, (hi - lo) * itemsize))
    if sum(p.nbytes for p in pieces) != numel * itemsize:
        raise MergeError(
            f"{path}: flat groups end before element {end}; the file does not match its model states"
        )
    return pieces


def _shape_lists(state: dict):
    return (
        [list(map(tuple, map(lambda kv: (kv[0], tuple(kv[1])), g.items()))) for g in state["param_shapes"]],
        [(k, tuple(v)) for k, v in (state.get("frozen_param_shapes") or {}).items()],
    )


def _tag_dir(engine: Path) -> tuple[Path, bool]:
    """The tag directory to read and whether it is a universal one."""
    universal = sorted({p.parent for p in engine.glob("*/zero") if p.is_dir()})
    tags = sorted({p.parent for p in engine.glob("*/zero_pp_rank_*_states.pt")} - set(universal))
    if not tags and len(universal) == 1:
        return universal[0], True
    if not tags:
        raise MergeError(f"{engine} has no DeepSpeed tag directory with *_states.pt files")
    if len(tags) > 1:
        raise MergeError(
            f"mixed tags in {engine}: {[t.name for t in tags]} each hold DeepSpeed rank files; a checkpoint holds "
            "one (maven_dist saves tag 'zero'); remove the stray directory"
        )
    return tags[0], False


def _rank_files(tag_dir: Path) -> dict[tuple[int, str], Path]:
    files = {}
    for path in sorted(tag_dir.glob("*_states.pt")):
        match = _RANK_FILE.fullmatch(path.name)
        if match is None:
            continue
        rank, mp, kind = int(match[1]), int(match[2]), match[3]
        if mp != 0:
            raise MergeError(
                f"{path} has model-parallel rank {mp}: a TP checkpoint is not a ZeRO-3 checkpoint"
            )
        files[(rank, kind)] = path
    if not files:
        raise MergeError(f"{tag_dir} has no zero_pp_rank_*_mp_rank_00_*_states.pt files")
    return files


def _check_rank_files(
    tag_dir: Path, files: dict[tuple[int, str], Path], world_size: int, kinds: tuple[str, ...]
) -> None:
    ranks = {r for r, _ in files}
    extra = sorted(r for r in ranks if r >= world_size)
    if extra:
        raise MergeError(
            f"{tag_dir} has rank files for ranks {extra}, but the checkpoint was saved by {world_size} ranks "
            f"(manifest world_size); the directory mixes saves of different world sizes"
        )
    missing = [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
        for r in range(world_size)
        for kind in kinds
        if (r, kind) not in files
    ]
    if missing:
        raise MergeError(
            f"{tag_dir} lacks {len(missing)} rank file(s) of a {world_size}-rank checkpoint: {missing[:6]}; "
            "copy them from the run or merge another checkpoint (--step)"
        )
