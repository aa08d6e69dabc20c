"""Initial values of the unified vocabulary's new rows (specials, visual codes, padding)."""

from __future__ import annotations

import torch


def init_new_rows(
    text_rows: torch.Tensor, num_new: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample `num_new` rows from a Gaussian with the text rows' mean and covariance.

    This is what transformers' ``resize_token_embeddings`` does (the "mean_resizing" default, after
    Hewitt 2021): new tokens start inside the distribution of known ones, so the h_eos pass that the
    selector needs in stage 1 gives meaningful states before stage 2 trains the code rows.
    """
    rows = text_rows.detach().double()
    mean = rows.mean(0)
    centered = rows - mean
    cov = centered.T @ centered / rows.shape[0]
    # transformers samples from N(mean, 1e-9 * cov): new rows sit at the mean with a tiny spread,
    # distinct enough to break symmetry. It falls back to the plain mean when that is not PD.
    chol, info = torch.linalg.cholesky_ex(cov * 1e-9)
    if info != 0:
        return mean.to(text_rows.dtype).expand(num_new, -1).clone()
    # fp32 noise, then widened: zero.Init casts new tensors to the training dtype, and the same
    # seed must give the same rows with and without ZeRO-3.
    noise = torch.randn(num_new, rows.shape[1], generator=generator, dtype=torch.float32).double()
    return (mean + noise @ chol.T).to(text_rows.dtype)
