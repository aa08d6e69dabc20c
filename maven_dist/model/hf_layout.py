"""The on-disk HF layout of a MaVEn model, and the exact mapping to the training module's names.

A saved MaVEn directory::

    config.json                  {"model_type": "maven", "spec": {...}, "vocab": {...}}
    tokenizer files              the extended tokenizer (also inside llm/)
    llm/                         a plain HF causal LM with the unified (padded) vocabulary:
                                 AutoModelForCausalLM / AutoTokenizer load it as it is
    vision_tower/                CLIPVisionModel + preprocessor_config.json
    maven_modules.safetensors    selector.* and projector.*
    discrete_tokenizer/          the k-means tokenizer the codes came from (SEED: a reference with hashes)

``config.json`` also names the chat template the model was trained with (``template``) and where its
discrete tokenizer is (``discrete_tokenizer``), so a directory plus raw images is enough to run it.

In training, the unified vocabulary's new rows live in ``vocab_new_rows.{embed,head}.weight``,
apart from the LLM's text rows (so stage 2 can train exactly them, with no optimizer state for the
text rows). On disk they are concatenated into ``model.embed_tokens.weight`` / ``lm_head.weight``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from maven_dist.contract.vocab import VocabLayout

LLM_DIR = "llm"
TOWER_DIR = "vision_tower"
MAVEN_MODULES_FILE = "maven_modules.safetensors"
CONFIG_FILE = "config.json"
DISCRETE_DIR = "discrete_tokenizer"

_TOWER_PREFIX = "vision_tower.tower."
_EMBED = "model.embed_tokens.weight"
_HEAD = "lm_head.weight"
_NEW_EMBED = "vocab_new_rows.embed.weight"
_NEW_HEAD = "vocab_new_rows.head.weight"
_SPLIT_ROWS = {_EMBED: _NEW_EMBED, _HEAD: _NEW_HEAD}
CLIP_MODEL_EXTRAS = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
"""What a whole ``CLIPModel`` checkpoint holds besides its vision tower: ``openai/clip-vit-large-patch14-336``
is published that way (one ``config.json`` with ``text_config`` and ``vision_config``), and LLaVA loads
its vision half with ``CLIPVisionModel.from_pretrained``. A base tower directory may be either, with the
tower's keys under ``vision_model.`` (CLIPModel, transformers 4) or bare (transformers 5)."""


def component_of(name: str) -> str:
    """Which saved component a training parameter name belongs to."""
    if name.startswith("llm.") or name.startswith("vocab_new_rows."):
        return LLM_DIR
    if name.startswith(_TOWER_PREFIX):
        return TOWER_DIR
    return MAVEN_MODULES_FILE


def to_hf_layout(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Training state dict -> {component: HF-layout state dict}; new vocab rows joined to the text rows."""
    out: dict[str, dict[str, torch.Tensor]] = {LLM_DIR: {}, TOWER_DIR: {}, MAVEN_MODULES_FILE: {}}
    for name, tensor in state.items():
        if name in (_NEW_EMBED, _NEW_HEAD):
            continue
        if name.startswith("llm."):
            key = name.removeprefix("llm.")
            if key in _SPLIT_ROWS:
                tensor = torch.cat([tensor, state[_SPLIT_ROWS[key]]])
            out[LLM_DIR][key] = tensor
        elif name.startswith(_TOWER_PREFIX):
            out[TOWER_DIR][name.removeprefix(_TOWER_PREFIX)] = tensor
        else:
            out[MAVEN_MODULES_FILE][name] = tensor
    return out


def from_hf_layout(
    component: str, key: str, tensor: torch.Tensor, layout: VocabLayout
) -> dict[str, torch.Tensor]:
    """One HF-layout tensor -> the training parameter(s) it holds (two for the split vocab rows)."""
    if component == LLM_DIR:
        if key in _SPLIT_ROWS:
            if tensor.shape[0] not in (layout.text_size, layout.padded_size):
                raise ValueError(
                    f"{key} has {tensor.shape[0]} rows; expected {layout.text_size} (base LLM) "
                    f"or {layout.padded_size} (MaVEn vocabulary)"
                )
            out = {f"llm.{key}": tensor[: layout.text_size]}
            if tensor.shape[0] == layout.padded_size:
                out[_SPLIT_ROWS[key]] = tensor[layout.text_size :]
            return out
        return {f"llm.{key}": tensor}
    if component == TOWER_DIR:
        if key.startswith(CLIP_MODEL_EXTRAS):
            return {}
        # CLIPModel files and transformers 4's CLIPVisionModel name the tower vision_model.*; 5 saves it bare
        return {_TOWER_PREFIX + key.removeprefix("vision_model."): tensor}
    return {key: tensor}


def iter_checkpoint_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (key, tensor) from a HF weights directory: safetensors (sharded or not), else
    ``pytorch_model*.bin`` loaded with ``weights_only=True`` (never unpickles code)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if files:
        yield from iter_safetensors(files)
        return
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {directory}")
    for file in bins:
        yield from load_torch_weights(file).items()


def load_torch_weights(file: Path) -> dict[str, torch.Tensor]:
    """``torch.load(file, weights_only=True)`` of a ``pytorch_model*.bin`` shard (Vicuna v1.5 ships them).

    Never inside ``deepspeed.zero.Init``: torch.load rebuilds each storage through the tensor
    constructors Init replaces, and a bf16 Init turns the file's fp16 storages into bf16 tensors whose
    bytes are then reinterpreted (garbage weights, no error). ``MavenModel.from_base`` reads weights after
    construction; ``tests/distributed/test_zero3_bf16.py`` checks that the loaded tensors equal the file's."""
    return torch.load(file, map_location="cpu", weights_only=True)


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (key, tensor) from safetensors files, one tensor in memory at a time."""
    for file in files:
        if not Path(file).is_file():
            raise FileNotFoundError(f"{file} is missing")
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield key, f.get_tensor(key)


def read_maven_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a saved MaVEn model")
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") != "maven":
        raise ValueError(f"{path} has model_type={cfg.get('model_type')!r}, expected 'maven'")
    return cfg


# ---------------------------------------------------------------------- the discrete tokenizer


@dataclass(frozen=True)
class DiscreteTokenizerFiles:
    """Where the discrete tokenizer a model was trained with lives."""

    kind: str
    """``kmeans`` or ``seed`` (model.discrete.tokenizer)."""
    path: Path
    """k-means: its directory; SEED: ``seed_quantizer.pt`` or the directory holding it."""
    eva_path: Path | None = None
    """SEED's EVA ViT-g weights, when the quantizer file does not carry them."""


def attach_discrete_tokenizer(model_dir: Path, files: DiscreteTokenizerFiles) -> dict:
    """Record the tokenizer in a model directory and return its ``config.json`` entry.

    The k-means tokenizer (a few MB) is copied into ``discrete_tokenizer/``; its CLIP tower is the model's
    own ``vision_tower/``. SEED (EVA ViT-g, ~2 GB) is referenced by path with the sha256 of each file,
    checked when the model is loaded for inference."""
    if files.kind == "kmeans":
        shutil.copytree(files.path, Path(model_dir) / DISCRETE_DIR, dirs_exist_ok=True)
        return {"kind": "kmeans", "path": DISCRETE_DIR}
    entry: dict = {"kind": files.kind, "path": str(Path(files.path).resolve()), "sha256": {}}
    for name, path in (("path", files.path), ("eva_path", files.eva_path)):
        if path is None:
            continue
        path = Path(path).resolve()
        entry[name] = str(path)
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                entry["sha256"][str(file)] = sha256_of(file)
    return entry


def discrete_tokenizer_files(model_dir: Path) -> DiscreteTokenizerFiles:
    """The tokenizer a model directory records (see :func:`attach_discrete_tokenizer`), hashes checked;
    FileNotFoundError/ValueError saying what to do when it is missing or changed."""
    model_dir = Path(model_dir)
    entry = read_maven_config(model_dir).get("discrete_tokenizer")
    if not entry:
        raise FileNotFoundError(
            f"{model_dir} does not record its discrete tokenizer (config.json has no 'discrete_tokenizer'): "
            "images cannot be turned into codes. Re-export the model with a recipe whose model.discrete.path "
            "exists, or add it with maven_dist.model.hf_layout.attach_discrete_tokenizer"
        )
    path = Path(entry["path"])
    path = path if path.is_absolute() else model_dir / path
    if not path.exists():
        raise FileNotFoundError(f"{model_dir}: its discrete tokenizer {path} ({entry['kind']}) is missing")
    for file, digest in entry.get("sha256", {}).items():
        if not Path(file).is_file():
            raise FileNotFoundError(f"{model_dir}: discrete tokenizer file {file} is missing")
        if sha256_of(Path(file)) != digest:
            raise ValueError(
                f"{model_dir}: discrete tokenizer file {file} has changed since the model was trained (sha256 "
                "differs); codes from it would not be the ones the model learnt. Restore the original file"
            )
    eva = entry.get("eva_path")
    return DiscreteTokenizerFiles(entry["kind"], path, Path(eva) if eva else None)


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
