"""What the merged directory holds: expected parameters, their HF-layout names and output shards.

The expected parameters come from the checkpoint's own skeleton: the MaVEn model is built on the meta
device from ``model/config.json`` and the component configs, so its ``state_dict()`` names the exact
tensors (and order) that ``MavenModel.save_pretrained`` would write. The mapping to the HF layout and
the shard split reproduce ``hf_layout.to_hf_layout`` and ``huggingface_hub.save_torch_state_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maven_dist.merge.errors import MergeError
from maven_dist.merge.source import SourceTensor
from maven_dist.model import hf_layout
from maven_dist.model.parts import PART_PREFIXES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_JOINED = {
    "llm.model.embed_tokens.weight": "vocab_new_rows.embed.weight",
    "llm.lm_head.weight": "vocab_new_rows.head.weight",
}
_JOINED_PARTS = {v: k for k, v in _JOINED.items()}
SAFETENSORS_PATTERN = "model{suffix}.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an output file: the row-wise concatenation of `sources`, cast to `dtype`."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[SourceTensor, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class OutFile:
    relpath: str
    tensors: list[OutTensor]
    metadata: dict[str, str] | None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class OutputFiles:
    files: list[OutFile]
    indexes: dict[str, dict] = field(default_factory=dict)
    """relpath -> index json content, for sharded components."""
    names: list[str] = field(default_factory=list)
    """Training names merged, in model order."""

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)


def expected_shapes(skeleton: Path) -> dict[str, tuple[int, ...]]:
    """Training name -> shape of every tensor `MavenModel.state_dict()` has, in order, for the
    model the skeleton describes (built on the meta device: no memory, no weights)."""
    from transformers import AutoConfig, CLIPVisionConfig

    from maven_dist.contract.vocab import VocabLayout
    from maven_dist.model.maven import MavenModel
    from maven_dist.model.spec import MavenSpec

    cfg = hf_layout.read_maven_config(skeleton)
    with torch.device("meta"):
        model = MavenModel.from_configs(
            AutoConfig.from_pretrained(skeleton / hf_layout.LLM_DIR),
            CLIPVisionConfig.from_pretrained(skeleton / hf_layout.TOWER_DIR),
            VocabLayout(**cfg["vocab"]),
            MavenSpec(**cfg["spec"]),
            init_weights=True,  # on the meta device initialisation costs nothing, and skipping it imports DeepSpeed
        )
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def select_names(
    expected: dict[str, tuple[int, ...]],
    tensors: dict[str, SourceTensor],
    where: str,
    only: list[str] | None = None,
    exclude_frozen: bool = False,
) -> list[str]:
    """Check the source against the expected parameters and choose what to merge (model order).

    A joined vocabulary tensor (text rows + new rows) is written whole when either half is chosen."""
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise MergeError(
            f"{where} lacks {len(missing)} expected parameters, e.g. {missing[:5]}; the checkpoint is incomplete"
        )
    unexpected = [n for n in tensors if n not in expected]
    if unexpected:
        raise MergeError(
            f"{where} holds {len(unexpected)} parameters the model does not have, e.g. {unexpected[:5]}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise MergeError(
                f"{where}: {name} has shape {tuple(tensors[name].shape)}, the model config expects {shape}"
            )
        if tensors[name].nbytes != math.prod(shape) * tensors[name].dtype.itemsize:
            raise MergeError(f"{where}: {name} has {tensors[name].nbytes} bytes on disk for shape {shape}")
    if only:
        unknown = sorted(set(only) - set(PART_PREFIXES))
        if unknown:
            raise MergeError(f"--only {unknown}: unknown part; choose from {list(PART_PREFIXES)}")
    chosen = set()
    for name in expected:
        if only and not name.startswith(tuple(PART_PREFIXES[p] for p in only)):
            continue
        if exclude_frozen and not tensors[name].trainable:
            continue
        chosen.add(name)
    for whole, rows in _JOINED.items():
        if whole in chosen or rows in chosen:
            chosen |= {whole, rows}
    if not chosen:
        raise MergeError(
            f"nothing to merge from {where} with --only {only} --exclude-frozen={exclude_frozen}"
        )
    return [n for n in expected if n in chosen]


def build_output_files(
    names: list[str], tensors: dict[str, SourceTensor], dtype: torch.dtype, max_shard_size: int
) -> OutputFiles:
    """HF-layout files for the chosen training names, as ``MavenModel.save_pretrained`` splits them."""
    components: dict[str, list[OutTensor]] = {
        hf_layout.LLM_DIR: [],
        hf_layout.TOWER_DIR: [],
        hf_layout.MAVEN_MODULES_FILE: [],
    }
    for name in names:
        if name in _JOINED_PARTS:
            continue  # written as the tail rows of its LLM tensor
        source = tensors[name]
        parts = (source, tensors[_JOINED[name]]) if name in _JOINED else (source,)
        shape = (sum(p.shape[0] for p in parts), *source.shape[1:])
        out_dtype = dtype if source.dtype.is_floating_point else source.dtype
        component = hf_layout.component_of(name)
        key = name
        if component == hf_layout.LLM_DIR:
            key = name.removeprefix("llm.")
        elif component == hf_layout.TOWER_DIR:
            key = name.removeprefix("vision_tower.tower.")
        components[component].append(OutTensor(key, shape, out_dtype, parts))
    layout = OutputFiles(files=[], names=list(names))
    for component in (hf_layout.LLM_DIR, hf_layout.TOWER_DIR):
        if components[component]:
            _split(layout, component, components[component], max_shard_size)
    if components[hf_layout.MAVEN_MODULES_FILE]:
        # save_pretrained writes this one with safetensors' save_file: one file, no metadata.
        layout.files.append(
            OutFile(hf_layout.MAVEN_MODULES_FILE, components[hf_layout.MAVEN_MODULES_FILE], None)
        )
    return layout


def _split(layout: OutputFiles, component: str, tensors: list[OutTensor], max_shard_size: int) -> None:
    """``huggingface_hub.split_torch_state_dict_into_shards``: greedy in order, an oversize tensor alone."""
    shards: list[list[OutTensor]] = []
    current: list[OutTensor] = []
    size = 0
    for t in tensors:
        if t.nbytes > max_shard_size:
            shards.append([t])
            continue
        if size + t.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current:
        shards.append(current)
    total = sum(t.nbytes for t in tensors)
    if len(shards) == 1:
        layout.files.append(
            OutFile(f"{component}/{SAFETENSORS_PATTERN.format(suffix='')}", shards[0], {"format": "pt"})
        )
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = SAFETENSORS_PATTERN.format(suffix=f"-{i + 1:05d}-of-{len(shards):05d}")
        layout.files.append(OutFile(f"{component}/{name}", shard, {"format": "pt"}))
        weight_map |= {t.key: name for t in shard}
    layout.indexes[f"{component}/{INDEX_FILE}"] = {
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    }


def parse_size(size: str | int) -> int:
    """'5GB' -> bytes, as huggingface_hub parses it (decimal units)."""
    if isinstance(size, int):
        return size
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        return parse_size_to_int(size)
    except ValueError as e:
        raise MergeError(f"--max-shard-size {size!r}: {e}") from e
