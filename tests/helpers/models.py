"""A small MaVEn built from the session's tiny base models (``tests/conftest.py:tiny_base``)."""

from __future__ import annotations

import importlib.util

import torch
from transformers import AutoTokenizer

from maven_dist.contract.vocab import extend_tokenizer
from maven_dist.model.maven import MavenModel
from maven_dist.model.spec import MavenSpec

NUM_CODES, CODEBOOK = 8, 64
FLASH_RUNS = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
"""flash-attn can run here (a CUDA device and the package)."""


def tiny_maven(tiny_base, attn: str = "sdpa") -> MavenModel:
    """MaVEn over the tiny LLM and tower: NUM_CODES codes from a CODEBOOK-entry codebook, alpha = 0.25."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.llm_dir)
    layout = extend_tokenizer(tokenizer, CODEBOOK, 128)
    spec = MavenSpec(
        keep_ratio=0.25, selector_hidden_size=16, num_codes=NUM_CODES, eos_token_id=tokenizer.eos_token_id
    )
    return MavenModel.from_base(
        tiny_base.llm_dir, tiny_base.tower_dir, layout, spec, seed=0, attn_implementation=attn
    )


def lm_logits(maven: MavenModel, batch, views) -> tuple[torch.Tensor, object]:
    """The unified-vocabulary logits [B, T, V] (fp32) at every position, and the assembled inputs they came
    from: the reference the tests hold generation and scoring to (the training loss never builds them)."""
    hidden, inputs = maven.lm_hidden(batch, views)
    return maven.logits(hidden).float(), inputs
