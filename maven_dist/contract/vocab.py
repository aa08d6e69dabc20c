"""The unified vocabulary: text tokens, image boundaries and one token per visual code.

Layout (the only place that knows it)::

    [0, text_size)                         text tokens of the base LLM (Vicuna: 32000)
    text_size                              <img>
    text_size + 1                          </img>
    text_size + 2 + k, k in [0, codebook)  <img_{k:05d}>, the k-th visual code
    ... up to padded_size                  padding rows, never produced by the tokenizer

The padded size is a multiple of ``pad_to_multiple_of`` so tensor-parallel vocabulary shards stay
128-aligned. Every row from ``text_size`` on (specials, codes, padding) is a *new row*: stage 2
trains exactly those, and the model keeps them in parameters of their own (see
``maven_dist/model/maven.py``) so the text rows can never change and carry no optimizer state.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass

import torch

IMG_START = "<img>"
IMG_END = "</img>"
IMAGE_PLACEHOLDER = "<image>"
"""Marks where an image goes in conversation text (LLaVA convention)."""
IMAGE_PLACEHOLDER_ID = -200
"""Id the data pipeline writes for an image placeholder; the model expands it (LLaVA's IMAGE_TOKEN_INDEX)."""
IGNORE_INDEX = -100
"""Label of positions that carry no loss."""


def code_token(k: int) -> str:
    return f"<img_{k:05d}>"


@dataclass(frozen=True)
class VocabLayout:
    text_size: int
    """Rows of the base LLM's vocabulary."""
    codebook_size: int
    """Visual codes (SEED: 8192)."""
    padded_size: int
    """Total rows after padding."""

    @classmethod
    def build(cls, text_size: int, codebook_size: int, pad_to_multiple_of: int) -> VocabLayout:
        used = text_size + 2 + codebook_size
        return cls(text_size, codebook_size, math.ceil(used / pad_to_multiple_of) * pad_to_multiple_of)

    @property
    def img_start_id(self) -> int:
        return self.text_size

    @property
    def img_end_id(self) -> int:
        return self.text_size + 1

    @property
    def code_offset(self) -> int:
        return self.text_size + 2

    @property
    def num_new_rows(self) -> int:
        return self.padded_size - self.text_size

    def code_to_token_id(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"visual codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]"
            )
        return codes + self.code_offset

    def token_id_to_code(self, ids: torch.Tensor) -> torch.Tensor:
        codes = ids - self.code_offset
        if ids.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError("token ids outside the visual-code range")
        return codes

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def extend_tokenizer(tokenizer, codebook_size: int, pad_to_multiple_of: int) -> VocabLayout:
    """Add `<img>`, `</img>` and one token per code to `tokenizer` (in place) and return the layout.

    Idempotent: a tokenizer saved after extension is recognised and left as it is. Raises if the
    tokenizer already holds other added tokens where the layout expects ours.
    """
    if IMG_START in tokenizer.get_vocab():
        text_size = tokenizer.convert_tokens_to_ids(IMG_START)
    else:
        text_size = len(tokenizer)
        new = [IMG_START, IMG_END] + [code_token(k) for k in range(codebook_size)]
        # Keep any special tokens the tokenizer already has; transformers 4 calls the flag
        # replace_additional_special_tokens, 5 replace_extra_special_tokens.
        params = inspect.signature(tokenizer.add_special_tokens).parameters
        keep = next(
            k for k in ("replace_extra_special_tokens", "replace_additional_special_tokens") if k in params
        )
        tokenizer.add_special_tokens({"additional_special_tokens": new}, **{keep: False})
    layout = VocabLayout.build(text_size, codebook_size, pad_to_multiple_of)
    expect = {
        IMG_START: layout.img_start_id,
        IMG_END: layout.img_end_id,
        code_token(0): layout.code_offset,
        code_token(codebook_size - 1): layout.code_offset + codebook_size - 1,
    }
    got = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in expect}
    if got != expect:
        raise ValueError(
            f"tokenizer's visual tokens are not where the vocabulary layout needs them: {got} != {expect}"
        )
    return layout
