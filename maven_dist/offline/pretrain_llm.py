"""Pretrain the miniature world's LLM on the world's text, as Vicuna comes pretrained on ours.

MaVEn's stages 2 and 3 train new rows and a projector against a *frozen* LLM: they align images to a
model that already knows its language. A random tiny LLM knows nothing, so those stages would align to
noise (issue 22). Here the tiny LLaMA is trained as a causal LM on the world's texts, each rendered exactly
as training renders it (``data/templates.py``): the captions in the ``plain`` format, and the conversations
in the chat templates **with every image written out as its caption** ("Two red circles and one blue square
on a striped background.") where the image will be.

Why the captions stand in for the images: Vicuna can answer a question about a scene it is *told* about,
which is what lets LLaVA's alignment stages work (the projector then only has to make an image read like a
description). What this tiny LLM gets in the demo's budget (150 steps) is less: the world's language, the
templates and each question's answer format; asked the held-out questions with the image written as its
caption it still answers at chance (measured: colour 0.18, shape 0.48, existence 0.50), so looking up the
answer in its context is learned later, with the images, in stage 4 (docs/experiments.md, "Does the model
see?").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from maven_dist.config import LLMConfig
from maven_dist.contract.vocab import IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER_ID
from maven_dist.data.templates import render
from maven_dist.offline.base_models import build_random_llm


def describe_images(turns: list[dict], images: Sequence[str], captions: dict[str, str]) -> list[dict]:
    """`turns` with each ``<image>`` replaced, in order, by the caption of the corresponding image."""
    pending = [captions[name] for name in images]
    out = []
    for turn in turns:
        pieces = turn["value"].split(IMAGE_PLACEHOLDER)
        text = pieces[0]
        for piece in pieces[1:]:
            text += pending.pop(0) + piece
        out.append(turn | {"value": text})
    if pending:
        raise ValueError(f"{len(pending)} image(s) without an {IMAGE_PLACEHOLDER} in {turns}")
    return out


def training_ids(samples: Sequence[tuple[list[dict], str]], tokenizer) -> list[list[int]]:
    """Token ids of each (LLaVA turns, template) sample as training renders them, image placeholders
    removed, ending with ``</s>``."""
    out = []
    for turns, template in samples:
        ids = [i for i in render(turns, template, tokenizer).input_ids if i != IMAGE_PLACEHOLDER_ID]
        out.append(ids if ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id])
    return out


def _blocks(sequences: list[list[int]], block: int) -> torch.Tensor:
    """The sequences concatenated and cut into rows of `block` ids (the tail dropped)."""
    flat = torch.tensor([i for ids in sequences for i in ids], dtype=torch.long)
    rows = len(flat) // block
    if rows == 0:
        raise ValueError(f"{len(flat)} tokens of text do not fill one block of {block}")
    return flat[: rows * block].view(rows, block)


def pretrain_llm(
    cfg: LLMConfig,
    tokenizer,
    samples: Sequence[tuple[list[dict], str]],
    out_dir: Path,
    seed: int,
    steps: int = 300,
    batch_size: int = 16,
    block: int = 256,
    lr: float = 3e-3,
    log: Callable[[str], None] = print,
) -> float:
    """Build the LLM of `cfg` into `out_dir` (``build_random_llm``), train it for `steps` steps on
    `samples` ((turns, template) pairs), save it back with the tokenizer; return the last loss."""
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    build_random_llm(cfg, tokenizer, out_dir, seed)
    model = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    data = _blocks(training_ids(samples, tokenizer), block)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        rows = data[torch.randint(len(data), (batch_size,), generator=generator)]
        loss = model(input_ids=rows, labels=rows, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses = (losses + [loss.item()])[-20:]
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"LLM step {step + 1}/{steps}: loss {sum(losses) / len(losses):.3f} "
                f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(losses) / len(losses)
