"""HF MaVEn layout <-> tensor/pipeline-parallel shards, exact both ways.

A full state dict uses ``MavenModel``'s parameter names (``maven_dist/model/hf_layout.py`` maps them to
and from the saved HF directory). A *shard* is what one tp rank holds of one pipeline layer
(``maven_dist/parallel/pipe_layers.py``: 0 = input stage, 1..L = decoder blocks, L+1 = output stage),
keyed ``"{layer}.{local name}"`` like the parameters of DeepSpeed's ``PipelineModule``. Shards are
cut per layer and never per stage, so one set of shards serves any pp; tp-sharded tensors are
contiguous slices along the output dimension (column-parallel, vocabulary rows) or the input
dimension (row-parallel), so ``cat`` rebuilds them bit for bit.

On disk (``save_shards`` / ``load_shards``)::

    OUT/maven_3d.json                     {"tp": 2, "num_layers": L, "maven": <config.json of the model>}
    OUT/layer_{i:03d}-tp_{r:02d}.safetensors
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from maven_dist.model import hf_layout

SHARDS_CONFIG = "maven_3d.json"

# (full-name pattern, pipeline layer or "block", local-name template, tp split dim or None)
_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW = ("o_proj", "down_proj")


@dataclass(frozen=True)
class Placement:
    layer: int
    """Pipeline layer index (0 input, 1..L blocks, L+1 output)."""
    local: str
    """The parameter's name inside that layer."""
    split_dim: int | None
    """Dimension cut over tp ranks; None: replicated."""


def placement(name: str, num_layers: int) -> Placement:
    """Where a MavenModel parameter lives in the 3D model."""
    if name == "llm.model.embed_tokens.weight":
        return Placement(0, "embed_text.weight", 0)
    if name == "vocab_new_rows.embed.weight":
        return Placement(0, "embed_new.weight", 0)
    if name.startswith(("vision_tower.", "selector.", "projector.")):
        return Placement(0, name, None)
    if name == "llm.model.norm.weight":
        return Placement(num_layers + 1, "norm.weight", None)
    if name == "llm.lm_head.weight":
        return Placement(num_layers + 1, "head_text.weight", 0)
    if name == "vocab_new_rows.head.weight":
        return Placement(num_layers + 1, "head_new.weight", 0)
    match = re.fullmatch(r"llm\.model\.layers\.(\d+)\.(.+)", name)
    if match:
        layer, local = int(match[1]), match[2]
        module = local.split(".")[-2]
        split = 0 if module in _COLUMN else 1 if module in _ROW else None
        return Placement(layer + 1, local, split)
    raise KeyError(f"{name}: no place in the 3D model (is it a MaVEn parameter?)")


def full_name(layer: int, local: str, num_layers: int) -> str:
    """Inverse of ``placement``: the MavenModel name of a layer's parameter."""
    if layer == 0:
        return {
            "embed_text.weight": "llm.model.embed_tokens.weight",
            "embed_new.weight": "vocab_new_rows.embed.weight",
        }.get(local, local)
    if layer == num_layers + 1:
        return {
            "norm.weight": "llm.model.norm.weight",
            "head_text.weight": "llm.lm_head.weight",
            "head_new.weight": "vocab_new_rows.head.weight",
        }[local]
    return f"llm.model.layers.{layer - 1}.{local}"


def shard_tensor(tensor: torch.Tensor, split_dim: int | None, tp_rank: int, tp: int) -> torch.Tensor:
    if split_dim is None:
        return tensor
    if tensor.shape[split_dim] % tp:
        raise ValueError(
            f"dimension {split_dim} of a {tuple(tensor.shape)} tensor does not split into tp={tp} parts"
        )
    return tensor.chunk(tp, dim=split_dim)[tp_rank].contiguous()


def unshard_state_dict(shards: list[dict[str, torch.Tensor]], num_layers: int) -> dict[str, torch.Tensor]:
    """Every tp rank's shards (list index = tp rank, all layers present) -> full MavenModel state."""
    out = {}
    for key in shards[0]:
        layer, local = key.split(".", 1)
        name = full_name(int(layer), local, num_layers)
        split = placement(name, num_layers).split_dim
        out[name] = shards[0][key] if split is None else torch.cat([s[key] for s in shards], dim=split)
    return out


def iter_maven_dir(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (MavenModel name, tensor) from a saved HF MaVEn directory, one tensor at a time."""
    from maven_dist.contract.vocab import VocabLayout

    directory = Path(directory)
    layout = VocabLayout(**hf_layout.read_maven_config(directory)["vocab"])
    for component in (hf_layout.LLM_DIR, hf_layout.TOWER_DIR):
        for key, tensor in hf_layout.iter_checkpoint_tensors(directory / component):
            yield from hf_layout.from_hf_layout(component, key, tensor, layout).items()
    from safetensors import safe_open

    with safe_open(directory / hf_layout.MAVEN_MODULES_FILE, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            yield key, f.get_tensor(key)


def num_llm_layers(directory: Path) -> int:
    return json.loads((Path(directory) / hf_layout.LLM_DIR / "config.json").read_text())["num_hidden_layers"]


def save_shards(maven_dir: Path, out_dir: Path, tp: int) -> Path:
    """HF MaVEn directory -> per-layer, per-tp-rank shards (streamed: one full tensor in memory at a time)."""
    maven_dir, out_dir = Path(maven_dir), Path(out_dir)
    num_layers = num_llm_layers(maven_dir)
    files: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for name, tensor in iter_maven_dir(maven_dir):
        place = placement(name, num_layers)
        for r in range(tp):
            files.setdefault((place.layer, r), {})[place.local] = shard_tensor(
                tensor, place.split_dim, r, tp
            ).clone()
    out_dir.mkdir(parents=True, exist_ok=True)
    for (layer, r), state in files.items():
        save_file(state, out_dir / f"layer_{layer:03d}-tp_{r:02d}.safetensors")
    config = {"tp": tp, "num_layers": num_layers, "maven": hf_layout.read_maven_config(maven_dir)}
    (out_dir / SHARDS_CONFIG).write_text(json.dumps(config, indent=2))
    return out_dir


def load_shards(shard_dir: Path) -> dict[str, torch.Tensor]:
    """Per-layer shards on disk -> full MavenModel state (safetensors only: nothing is unpickled)."""
    shard_dir = Path(shard_dir)
    path = shard_dir / SHARDS_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {shard_dir} holds no 3D shards (write them with save_shards)"
        )
    config = json.loads(path.read_text())
    tp, num_layers = config["tp"], config["num_layers"]
    per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for layer in range(num_layers + 2):
        for r in range(tp):
            file = shard_dir / f"layer_{layer:03d}-tp_{r:02d}.safetensors"
            if not file.is_file():
                raise FileNotFoundError(f"{file} is missing: the shard set in {shard_dir} is incomplete")
            per_rank[r] |= {f"{layer}.{k}": v for k, v in load_file(file).items()}
    return unshard_state_dict(per_rank, num_layers)
