"""The 7B recipes on base models laid out as the hub ships them (issue 24), at reduced depth and width.

Vicuna-7B-v1.5-shaped (a SentencePiece tokenizer.model without tokenizer.json, fp16 .bin shards), the
whole-CLIPModel openai/clip-vit-large-patch14-336 layout (336 px, 24 x 24 patches) and SEED-2's
seed_quantizer.pt with its decoder-side keys next to eva_vit_g.pth (tests/helpers/hub_models.py) go
through what docs/data_preparation.md tells a user to run: maven prepare (LLaVA-558K-like captions and
LLaVA-665K-like conversations), maven tokenize with SEED, recipes/maven-7b stage 2 then stage 4 (one
process, and two ranks of ZeRO-3), maven merge, maven chat and maven eval. Two optimizer steps each.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from maven_dist.cli import main as maven
from tests.helpers.hub_models import (
    build_clip_336_dir,
    build_seed2_files,
    build_vicuna_dir,
    train_llama_sentencepiece,
)
from tests.helpers.torchrun import run_train

pytestmark = pytest.mark.timeout(900)

CAPTIONS = ["A red circle.", "Two blue squares.", "A green circle and a red square.", "It is blue."]
QUESTIONS = [
    "What is shown?\n<image>",
    "<image>\nWhat colour is the circle?",
    "Describe the image <image> please.",
]


def _records(kind: str) -> list[dict]:
    out = []
    for k in range(8):
        if kind == "captions":
            turns = [("<image>\nDescribe the image.", CAPTIONS[k % 4])]
        else:  # multi-turn, the image placed as LLaVA-Instruct places it (often at the end)
            turns = [(QUESTIONS[k % 3], CAPTIONS[k % 4]), ("And the square?", "It is blue.")]
        conv = [{"from": r, "value": v} for q, a in turns for r, v in (("human", q), ("gpt", a))]
        out.append({"id": f"{kind}-{k}", "image": f"{k:05d}.png", "conversations": conv})
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    """The base-model directories, two prepared and SEED-tokenized shards directories, and the overrides
    that point recipes/maven-7b at them."""
    root = tmp_path_factory.mktemp("hub")
    spm = train_llama_sentencepiece(root / "spm" / "tokenizer.model")
    vicuna = build_vicuna_dir(root / "models/vicuna-7b-v1.5", spm)
    clip = build_clip_336_dir(root / "models/clip-vit-large-patch14-336")
    seed = build_seed2_files(root / "models/seed")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(8):  # landscape and portrait, so the letterbox pads
        h, w = (40, 64) if k % 2 else (72, 48)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{k:05d}.png")
    shards = {}
    for kind, template in (("captions", "plain"), ("conversations", "vicuna_v1")):
        (root / f"{kind}.json").write_text(json.dumps(_records(kind)))
        out = root / "shards" / kind
        argv = [str(root / f"{kind}.json"), "--image-root", str(images), "--out", str(out)]
        argv += ["--tokenizer", str(vicuna), "--template", template, "--tower", str(clip), "--keep-original"]
        assert maven(["prepare", *argv, "--workers", "0"]) == 0
        assert json.loads((out / "manifest.json").read_text())["counts"]["kept"] == 8
        shards[kind] = out
    seed_args = [
        "--tokenizer",
        "seed",
        "--path",
        str(seed / "seed_quantizer.pt"),
        "--eva",
        str(seed / "eva_vit_g.pth"),
    ]
    assert (
        maven(["tokenize", *map(str, shards.values()), *seed_args, "--device", "cpu", "--batch-size", "8"])
        == 0
    )
    return {"root": root, "vicuna": vicuna, "clip": clip, "seed": seed, "images": images, **shards}


def _overrides(hub: dict[str, Path], run_dir: Path, stage: str, world: int) -> list[str]:
    data = hub["captions"] if stage == "stage2" else hub["conversations"]
    return [
        f"run_dir={run_dir}",
        f"model.llm.path={hub['vicuna']}",
        f"model.vision.path={hub['clip']}",
        f"model.discrete.path={hub['seed'] / 'seed_quantizer.pt'}",
        f"model.discrete.eva_path={hub['seed'] / 'eva_vit_g.pth'}",
        "model.selector.hidden_size=32",
        f"data.path={data}",
        "data.num_workers=0",
        "data.val_fraction=0.0",
        "stage.micro_batch_size=2",
        f"stage.global_batch_size={2 * world}",
        "stage.max_steps=2",
        "stage.dtype=fp32",
        "stage.eval_every=0",
        "checkpoint.every_steps=2",
        "tracking.enabled=false",
        *(["stage.init_from=stage2"] if stage == "stage4" else []),
    ]


def _shard_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(str(f))
    for f in sorted(directory.glob("pytorch_model-*.bin")):
        out |= torch.load(f, weights_only=True)
    return out


def _check_exports(hub: dict[str, Path], run_dir: Path) -> None:
    # Stage 2 trains only the new vocabulary rows: every other LLM weight of its export is Vicuna's fp16
    # file, cast to the stage dtype and nothing else (under ZeRO-3 too, where the .bin shards are read
    # inside deepspeed.zero.Init).
    exported = _shard_tensors(run_dir / "stage2" / "export" / "llm")
    for name, value in _shard_tensors(hub["vicuna"]).items():
        got = exported[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            got = got[: value.shape[0]]  # the text rows; the visual vocabulary follows
        assert torch.equal(got, value.to(torch.float32)), name
    # The stage-4 export's tokenizer, loaded by plain transformers, prompts with the training ids.
    from transformers import AutoTokenizer

    from maven_dist.data.templates import render_prompt

    export = run_dir / "stage4" / "export"
    assert json.loads((export / "config.json").read_text())["template"] == "vicuna_v1"
    tok = AutoTokenizer.from_pretrained(export)
    turns = [("What colour is the circle?", " It is red. "), ("And the square?", None)]
    messages = [{"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("assistant", a)) if c]
    ids = tok.apply_chat_template(messages, tokenize=True)
    llava = [
        {"from": m["role"].replace("user", "human").replace("assistant", "gpt"), "value": m["content"]}
        for m in messages
    ]
    assert list(ids["input_ids"] if hasattr(ids, "keys") else ids) == render_prompt(llava, "vicuna_v1", tok)


def _merge_and_chat(hub: dict[str, Path], run_dir: Path, out: Path, capsys) -> Path:
    merged = out / "merged"
    assert maven(["merge", str(run_dir), str(merged), "--stage", "stage4"]) == 0
    capsys.readouterr()
    question = "What is shown?\n<image>"
    chat = ["chat", str(merged), "--image", str(hub["images"] / "00001.png"), "--max-new-tokens", "4"]
    assert maven([*chat, "--device", "cpu", question]) == 0
    assert capsys.readouterr().out.strip()
    return merged


@pytest.fixture
def in_process_training(monkeypatch):
    """`maven train` in this process (one rank): no second start-up of torch, transformers and DeepSpeed.
    The environment the launch sets (MASTER_ADDR, ...) is put back afterwards."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_one_process(hub, tmp_path, capsys, in_process_training):
    run_dir = tmp_path / "run"
    for stage in ("stage2", "stage4"):
        overrides = _overrides(hub, run_dir, stage, world=1)
        assert maven(["train", f"recipes/maven-7b/{stage}.yaml", *(f"--set={o}" for o in overrides)]) == 0
    _check_exports(hub, run_dir)
    merged = _merge_and_chat(hub, run_dir, tmp_path, capsys)
    out = tmp_path / "eval"
    evaluate = ["eval", str(merged), "--tasks", "vqav2,mmbench", "--limit", "2", "--max-new-tokens", "4"]
    assert maven([*evaluate, "--device", "cpu", "--out", str(out), "--no-tracking"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"vqav2", "mmbench"}  # scored (a generated answer and option likelihoods)


@pytest.mark.distributed
@pytest.mark.slow  # two torchrun launches: ~60 s on the shared 2-core machine
def test_zero3_two_ranks(hub, tmp_path, capsys):
    """The same stages on two ranks of ZeRO-3 (the merged sharded checkpoint answers too; maven eval is the
    one-process test's: it reads the same kind of directory)."""
    run_dir = tmp_path / "run"
    for stage in ("stage2", "stage4"):
        run_train(2, f"recipes/maven-7b/{stage}.yaml", _overrides(hub, run_dir, stage, world=2))
    _check_exports(hub, run_dir)
    _merge_and_chat(hub, run_dir, tmp_path, capsys)
