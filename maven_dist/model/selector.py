"""The patch selector: which continuous patches the discrete view says are worth keeping.

Paper §3.2: s_i = sigmoid(MLP_3([f_i ; h_eos])), keep the top floor(alpha * N) patches. Selection
keeps raster order so the LLM sees kept patches in their spatial order.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PatchSelector(nn.Module):
    """3-layer MLP scoring each patch feature against the image's discrete summary h_eos."""

    def __init__(self, feature_size: int, llm_size: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(feature_size + llm_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, 1),
        )

    def forward(self, features: torch.Tensor, h_eos: torch.Tensor) -> torch.Tensor:
        """features [N, P, f], h_eos [N, d] -> logits [N, P] (sigmoid gives s_i)."""
        h = h_eos.to(features.dtype)[:, None, :].expand(-1, features.shape[1], -1)
        return self.mlp(torch.cat([features, h], dim=-1)).squeeze(-1)


def select_top_patches(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices [N, keep] of the `keep` highest-scoring patches per row, ascending (raster order)."""
    return scores.topk(keep, dim=-1).indices.sort(dim=-1).values


def selector_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of patch logits [N, P] against 0/1 labels [N, P]."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


@torch.no_grad()
def selector_metrics(
    logits: torch.Tensor, labels: torch.Tensor, threshold: float, keep: int
) -> dict[str, torch.Tensor]:
    """Quality of the selector against the patch labels, micro-averaged over the batch's images:

    * ``precision`` / ``recall`` / ``f1`` of ``sigmoid(logits) > threshold``;
    * ``precision_at_k`` / ``recall_at_k`` of the top-`keep` selection the model actually uses
      (k = floor(alpha * N)): labelled patches among the kept ones, and kept ones among the labelled.
    """
    truth = labels.bool()
    positives = truth.sum().float().clamp(min=1)
    pred = torch.sigmoid(logits.float()) > threshold
    tp = (pred & truth).sum().float()
    precision = tp / pred.sum().clamp(min=1)
    recall = tp / positives
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    kept = torch.zeros_like(truth).scatter_(1, logits.topk(keep, dim=-1).indices, True)
    tp_k = (kept & truth).sum().float()
    return {
        "selector/precision": precision,
        "selector/recall": recall,
        "selector/f1": f1,
        "selector/precision_at_k": tp_k / kept.sum().clamp(min=1),
        "selector/recall_at_k": tp_k / positives,
    }
