"""Pretrain the miniature world's LLM on the world's text, as Vicuna comes pretrained on ours.

MaVEn's stages 2 and 3 train new rows and a projector against a *frozen* LLM: they align images to a
model that already knows its language and can read what it is given. A random tiny LLM can do neither, so
those stages would align to noise (issue 22). Here the tiny LLaMA is trained as a causal LM on the world's
texts, each rendered exactly as training renders it (``data/templates.py``):

* the captions, in the ``plain`` format, every token learned (the world's language);
* each caption conversation and each question conversation in the chat template **with every image written
  out as its caption** ("Two red circles and one blue square on a striped background.") where the image will
  be, the loss on the assistant's answers only, as instruction tuning takes it: the caption repeated back,
  and each question answered from the caption in context.

Why the captions stand in for the images, and why answers only: Vicuna can answer a question about a scene it
is *told* about, which is what lets LLaVA's alignment stages work (the projector then only has to make an
image read like a description), and stage 4 builds on the same reading. Measured on the held-out questions
asked with the image written as its caption (docs/experiments.md): trained on every token, this LLM answered
at chance after 150 and after 600 steps; on the answers, with 10,000 scenes of text beside the 1,000 images
(``demo.llm_text_scenes``: text costs a fraction of an image, as Vicuna read far more text than LLaVA has
images), it answers shape questions at 0.82 after 600 steps, and the model ``make demo`` trains on it answers
the held-out colour questions from the image at 0.69 (0.15 with a blank image) where it had scored 0.14.
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


def training_rows(samples: Sequence[tuple[list[dict], str]], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels of the (LLaVA turns, template) samples one after another, as training renders
    them, image placeholders removed, each sample ending with ``</s>``: ``plain`` samples are labelled on
    every token, the others on their answers (IGNORE_INDEX elsewhere)."""
    ids, labels = [], []
    for turns, template in samples:
        rendered = render(turns, template, tokenizer)
        kept = [
            (i, y)
            for i, y in zip(rendered.input_ids, rendered.labels, strict=True)
            if i != IMAGE_PLACEHOLDER_ID
        ]
        if kept[-1][0] != tokenizer.eos_token_id:
            kept.append((tokenizer.eos_token_id, tokenizer.eos_token_id))
        ids += [i for i, _ in kept]
        labels += [i if template == "plain" else y for i, y in kept]
    return ids, labels


def _blocks(flat: list[int], block: int) -> torch.Tensor:
    """`flat` cut into rows of `block` ids (the tail dropped)."""
    rows = len(flat) // block
    if rows == 0:
        raise ValueError(f"{len(flat)} tokens of text do not fill one block of {block}")
    return torch.tensor(flat[: rows * block], dtype=torch.long).view(rows, block)


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
    `samples` ((turns, template) pairs, labelled as :func:`training_rows` says), save it back with the
    tokenizer; return the mean loss of the last steps."""
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    build_random_llm(cfg, tokenizer, out_dir, seed)
    model = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    ids, labels = training_rows(samples, tokenizer)
    data, targets = _blocks(ids, block), _blocks(labels, block)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        rows = torch.randint(len(data), (batch_size,), generator=generator)
        loss = model(input_ids=data[rows], labels=targets[rows], use_cache=False).loss
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
