"""Initial values of the unified vocabulary's new rows (specials, visual codes, padding).

Two draws from a Gaussian fitted to the LLM's text rows, N(mean, scale * cov):

* ``mean`` (scale 1e-9): what transformers' ``resize_token_embeddings`` does ("mean resizing", after
  Hewitt 2021). Every new row sits at the mean of the text rows: new tokens change no prediction.
* ``text_distribution`` (scale 1): new rows as spread out as the text rows themselves.

The output head's new rows always use ``mean``: at the mean they take a negligible share of the
softmax, so the text predictions of the base LLM are unchanged at the start of training. The input
embedding's new rows default to ``text_distribution`` (``model.vocab.embed_init``): MaVEn's patch
selector reads h_eos, the LLM's state after an image's code block, and with every code at the mean
all images give the same h_eos (measured on the tiny recipe: ``selector/h_eos_spread`` ~1e-4, against
~0.6 with distinct rows), so a selector trained on it cannot use the discrete view. The README gives the
measurement (``bench/selector_guidance.py``).
"""

from __future__ import annotations

from typing import Literal

import torch

RowInit = Literal["text_distribution", "mean"]

SCALES: dict[str, float] = {"text_distribution": 1.0, "mean": 1e-9}


def init_new_rows(
    text_rows: torch.Tensor, num_new: int, kind: RowInit, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`num_new` rows drawn from N(mean, scale * cov) of `text_rows` (see the module doc for `kind`)."""
    rows = text_rows.detach().double()
    mean = rows.mean(0)
    centered = rows - mean
    cov = centered.T @ centered / rows.shape[0] * SCALES[kind]
    root = _psd_root(cov)
    # fp32 noise, then widened: zero.Init casts new tensors to the training dtype, and the same
    # seed must give the same rows with and without ZeRO-3.
    noise = torch.randn(num_new, rows.shape[1], generator=generator, dtype=torch.float32).double()
    return (mean + noise @ root.T).to(text_rows.dtype)


def _psd_root(cov: torch.Tensor) -> torch.Tensor:
    """A matrix R with R R^T = cov: Cholesky where cov is positive definite, else the symmetric root
    (fewer text rows than dimensions make cov singular)."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if info == 0:
        return chol
    values, vectors = torch.linalg.eigh(cov)
    return vectors * values.clamp(min=0).sqrt()
