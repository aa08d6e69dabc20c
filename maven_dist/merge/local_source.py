"""Reader for the single-process engine state (``engine/model.safetensors`` with training names)."""

from __future__ import annotations

import json
import struct

import yaml

from maven_dist.merge.errors import MergeError
from maven_dist.merge.source import CheckpointRef, Piece, SourceTensor
from maven_dist.model.parts import part_of

SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def read_safetensors_header(path) -> tuple[dict, int]:
    """(header, data start) of a safetensors file, with clear errors for truncated files."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MergeError(f"{path} is truncated ({size} bytes): no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise MergeError(f"{path} is truncated or corrupt: header of {n} bytes in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MergeError(f"{path} is corrupt: its safetensors header is not JSON ({e})") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise MergeError(f"{path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    return header, 8 + n


class LocalSource:
    kind = "local"
    world_size = 1

    def __init__(self, ref: CheckpointRef):
        self.ref = ref
        self.path = ref.engine_dir / "model.safetensors"
        self.trainable_parts = trainable_parts_of(ref)
        self.knows_trainable = self.trainable_parts is not None

    def tensors(self) -> dict[str, SourceTensor]:
        import torch

        header, start = read_safetensors_header(self.path)
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = getattr(torch, SAFETENSORS_DTYPES[info["dtype"]])
            trainable = self.trainable_parts is None or part_or_none(name) in self.trainable_parts
            out[name] = SourceTensor(
                name, tuple(info["shape"]), dtype, (Piece(self.path, start + begin, end - begin),), trainable
            )
        return out


def part_or_none(name: str) -> str | None:
    """The part a training name belongs to, or None for names outside every part."""
    try:
        return part_of(name)
    except KeyError:
        return None


def trainable_parts_of(ref: CheckpointRef) -> set[str] | None:
    """The stage's trainable parts from the resolved recipe saved beside the checkpoints."""
    recipe = ref.path.parent.parent / "resolved_recipe.yaml"
    if not recipe.is_file():
        return None
    stage = (yaml.safe_load(recipe.read_text()) or {}).get("stage", {})
    parts = stage.get("trainable")
    return set(parts) if parts is not None else None
