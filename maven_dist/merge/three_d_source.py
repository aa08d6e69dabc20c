"""Reader for 3D (TP x PP x ZeRO-1 DP) engine state: DeepSpeed's pipeline checkpoint in ``engine/3d/``.

File format (DeepSpeed 0.19 ``PipelineModule.save_state_dict``, written by ``ThreeDEngine.save``):

* ``layer_II-model_RR-model_states.pt``: the ``state_dict()`` of pipeline layer II (0 input stage,
  1..L decoder blocks, L+1 output stage; ``maven_dist/parallel/pipe_layers.py``) on tp rank RR, written
  by data-parallel rank 0 of each stage. Every parameter is there, trained or frozen, with the
  layer's local names; megatron-core adds ``*._extra_state`` entries (None), which are not weights.
* ``mp_rank_MM_model_states.pt`` (one per pp x tp rank): bookkeeping (``global_steps``,
  ``dp_world_size``, ``mp_world_size``, ``ds_version``); used here only to check the files belong
  to one save of the manifest's layout.
* ``zero_pp_rank_D_mp_rank_MM_optim_states.pt``: the ZeRO-1 optimizer shards; never read.

Names and tp slicing come from ``maven_dist.parallel.convert`` (``full_name`` / ``placement``), the
same table the engine loads and exports with, so the rules live in one place. A tp-sharded tensor
is the concatenation of the ranks' slices along its split dimension: along dim 0 (column-parallel,
vocabulary rows) that is each rank's bytes in turn; along dim 1 (row-parallel) it is, row by row,
each rank's part of the row (``source.InterleavedPieces``: generated lazily, so a 7B output layout holds no
per-row objects, and read in runs of rows, so a 7B merge does not make a million small reads).
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from maven_dist.merge.errors import MergeError
from maven_dist.merge.local_source import part_or_none, trainable_parts_of
from maven_dist.merge.source import CheckpointRef, InterleavedPieces, Piece, SourceTensor
from maven_dist.merge.torch_files import TensorLocation, TorchFileIndex
from maven_dist.parallel.convert import full_name, num_llm_layers, placement

_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
_MP_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")


class ThreeDSource:
    """Every MavenModel parameter of a 3D checkpoint as byte ranges in its layer files (see module doc)."""

    kind = "3d"

    def __init__(self, ref: CheckpointRef, threads: int = 4):
        self.ref = ref
        layout = ref.manifest.get("layout") or {}
        self.tp, self.pp, self.dp = (int(layout.get(k, 1)) for k in ("tp", "pp", "dp"))
        self.world_size = int(ref.manifest.get("world_size", 0)) or self.tp * self.pp * self.dp
        self.num_layers = num_llm_layers(ref.skeleton)
        self.tag_dir = _tag_dir(ref.engine_dir)
        self.trainable_parts = trainable_parts_of(ref)
        self.knows_trainable = self.trainable_parts is not None
        layer_files, mp_files = self._files()
        with ThreadPoolExecutor(max(1, threads)) as pool:
            keys = sorted(layer_files)
            self.layers = dict(
                zip(keys, pool.map(lambda k: TorchFileIndex(layer_files[k]), keys), strict=True)
            )
            self.mp = list(pool.map(TorchFileIndex, mp_files))
        self._check_same_save()

    # ------------------------------------------------------------------ checks

    def _files(self) -> tuple[dict[tuple[int, int], Path], list[Path]]:
        layer_files: dict[tuple[int, int], Path] = {}
        mp_files: dict[int, Path] = {}
        for path in sorted(self.tag_dir.glob("*model_states.pt")):
            if match := _LAYER_FILE.fullmatch(path.name):
                layer_files[(int(match[1]), int(match[2]))] = path
            elif match := _MP_FILE.fullmatch(path.name):
                mp_files[int(match[1])] = path
        where = (
            f"{self.tag_dir} (manifest layout tp={self.tp}, pp={self.pp}, {self.num_layers} decoder layers)"
        )
        extra = sorted(
            p.name for (layer, r), p in layer_files.items() if r >= self.tp or layer > self.num_layers + 1
        )
        extra += sorted(p.name for m, p in mp_files.items() if m >= self.tp * self.pp)
        if extra:
            raise MergeError(
                f"{where} has files outside the layout: {extra[:6]}; the directory mixes saves of different layouts"
            )
        missing = [
            f"layer_{layer:02d}-model_{r:02d}-model_states.pt"
            for layer in range(self.num_layers + 2)
            for r in range(self.tp)
            if (layer, r) not in layer_files
        ]
        missing += [f"mp_rank_{m:02d}_model_states.pt" for m in range(self.tp * self.pp) if m not in mp_files]
        if missing:
            raise MergeError(
                f"{where} lacks {len(missing)} file(s) of the checkpoint: {missing[:6]}; copy them from the run "
                "or merge another checkpoint (--step)"
            )
        return layer_files, [mp_files[m] for m in sorted(mp_files)]

    def _check_same_save(self) -> None:
        head = self.mp[0]
        for index in self.mp:
            state = index.obj
            if not isinstance(state, dict) or "global_steps" not in state:
                raise MergeError(f"{index.path} is not a DeepSpeed model-states file (no global_steps)")
            for key in ("global_steps", "ds_version"):
                if state.get(key) != head.obj.get(key):
                    raise MergeError(
                        f"mixed checkpoints in {self.tag_dir}: {index.path.name} has {key}={state.get(key)!r} but "
                        f"{head.path.name} has {head.obj.get(key)!r}; every file must come from the same save"
                    )
            sizes = (state.get("mp_world_size"), state.get("dp_world_size"))
            if sizes != (self.tp * self.pp, self.dp):
                raise MergeError(
                    f"{index.path} was saved by a run of mp={sizes[0]} (tp x pp), dp={sizes[1]}, but the manifest "
                    f"({self.ref.path / 'manifest.json'}) says tp={self.tp}, pp={self.pp}, dp={self.dp}"
                )
        for index in self.layers.values():
            if not isinstance(index.obj, dict):
                raise MergeError(
                    f"{index.path} is not a layer state dict (it holds a {type(index.obj).__name__})"
                )

    # ------------------------------------------------------------------ tensors

    def tensors(self) -> dict[str, SourceTensor]:
        out: dict[str, SourceTensor] = {}
        for layer in range(self.num_layers + 2):
            ranks = [self.layers[(layer, r)] for r in range(self.tp)]
            names = [k for k, v in ranks[0].obj.items() if isinstance(v, torch.Tensor)]
            for r, index in enumerate(ranks[1:], start=1):
                other = [k for k, v in index.obj.items() if isinstance(v, torch.Tensor)]
                if other != names:
                    raise MergeError(
                        f"{index.path} holds other parameters than {ranks[0].path.name} (tp rank {r} vs 0)"
                    )
            for local in names:
                name = full_name(layer, local, self.num_layers)
                try:
                    place = placement(name, self.num_layers)
                except KeyError as e:
                    raise MergeError(f"{ranks[0].path}: {local} is no MaVEn parameter ({e})") from None
                if (place.layer, place.local) != (layer, local):
                    raise MergeError(
                        f"{ranks[0].path}: {local} belongs to pipeline layer {place.layer}, not {layer}"
                    )
                slices = [index.locate(index.obj[local]) for index in ranks]
                out[name] = self._assemble(name, slices, place.split_dim)
        return out

    def _assemble(self, name: str, slices: list[TensorLocation], split_dim: int | None) -> SourceTensor:
        first = slices[0]
        for loc in slices[1:]:
            if (loc.shape, loc.dtype) != (first.shape, first.dtype):
                raise MergeError(
                    f"{loc.path}: {name} is {loc.shape} {loc.dtype}, but {first.path.name} has {first.shape} {first.dtype}"
                )
        trainable = self.trainable_parts is None or part_or_none(name) in self.trainable_parts
        if split_dim is None or self.tp == 1:
            # Replicated over tp ranks (norms, vision tower, selector, projector): rank 0's copy.
            return SourceTensor(
                name, first.shape, first.dtype, (Piece(first.path, first.offset, first.nbytes),), trainable
            )
        shape = list(first.shape)
        shape[split_dim] *= self.tp
        outer = math.prod(first.shape[:split_dim])
        inner = math.prod(first.shape[split_dim:]) * first.dtype.itemsize
        return SourceTensor(
            name,
            tuple(shape),
            first.dtype,
            InterleavedPieces([Piece(s.path, s.offset, s.nbytes) for s in slices], outer, inner),
            trainable,
        )


def _tag_dir(engine: Path) -> Path:
    tags = sorted({p.parent for p in engine.glob("*/layer_*-model_*-model_states.pt")})
    if not tags:
        raise MergeError(
            f"{engine} has no DeepSpeed pipeline tag directory with layer_*-model_*-model_states.pt files"
        )
    if len(tags) > 1:
        raise MergeError(
            f"mixed tags in {engine}: {[t.name for t in tags]} each hold pipeline layer files; a checkpoint holds "
            "one (maven_dist saves tag '3d'); remove the stray directory"
        )
    return tags[0]
