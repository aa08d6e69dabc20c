"""Next-token cross-entropy on labelled positions only, a chunk of rows at a time (issue 16).

Most positions of a training sequence carry no label (visual tokens, prompts, padding), yet the
unified-vocabulary logits of every position were computed and kept: [B, T, V] in fp32 is ~5 GB for
one 16 x 2048 micro-batch at 7B (V = 40.3k with the visual codes). Here the labelled positions'
hidden states are gathered first, then the head and the cross-entropy run over ``chunk_rows`` of them
at a time, each chunk under ``torch.utils.checkpoint``: forward keeps one chunk's logits alive at a
time and backward recomputes them chunk by chunk, so no logit-sized tensor of the whole micro-batch
ever exists. Measured in ``bench/loss_memory.py`` (docs/performance.md).

The loss is exactly the former one: the sum of the per-token losses over the labelled tokens of the
micro-batch divided by their number, the head computed in the weights' dtype and cast to fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from maven_dist.contract.vocab import IGNORE_INDEX

LOSS_CHUNK_ROWS = 1024
"""Rows per loss chunk. At 7B one chunk's fp32 logits are 1024 x 40320 x 4 B = 165 MB, and a chunk's
working set (logits, softmax, their gradients) ~4 of those, about the size of the head's fp32 weight
gradient; the chunk's head matmul (1024 x 4096 x 40320) is still a large GEMM (docs/performance.md)."""

ChunkLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(rows [n, d], targets [n]) -> per-row cross-entropy [n] (fp32)."""


def labelled_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states [N, d] that predict a label, and those labels [N]: position t predicts
    ``labels[t + 1]``; positions whose next label is IGNORE_INDEX are left out (row-major order)."""
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    return hidden[:, :-1][labelled], targets[labelled]


def chunked_token_losses(
    rows: torch.Tensor, targets: torch.Tensor, chunk_loss: ChunkLoss, chunk_rows: int = LOSS_CHUNK_ROWS
) -> torch.Tensor:
    """``chunk_loss`` over `rows` in chunks of `chunk_rows`, concatenated: per-row losses [N].

    With autograd on, each chunk is checkpointed (its logits are recomputed in backward, not kept).
    `chunk_loss` runs at least once, on zero rows too: every rank then runs the same operations
    (tensor-parallel collectives inside it) and every weight it uses gets a (zero) gradient.
    """
    losses = []
    for start in range(0, max(rows.shape[0], 1), chunk_rows):
        r, t = rows[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled():
            losses.append(checkpoint(chunk_loss, r, t, use_reentrant=False))
        else:
            losses.append(chunk_loss(r, t))
    return losses[0] if len(losses) == 1 else torch.cat(losses)


class _HeadCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of ``cat([rows @ w.T for w in weights]).float()``, a chunk of rows at a time.

    Forward keeps only its inputs. Backward recomputes each chunk's logits, writes that chunk's rows'
    gradient in place and adds its weight gradients into one buffer per weight (``addmm_``):
    autograd over checkpointed chunks would hold a second weight-sized gradient while summing them.
    The arithmetic is the former loss's: logits in the weights' dtype cast to fp32, the fp32 softmax
    gradient cast back for the two matmuls.
    """

    @staticmethod
    def forward(ctx, rows, targets, chunk_rows, *weights):
        losses = rows.new_empty(rows.shape[0], dtype=torch.float32)
        for start in range(0, rows.shape[0], chunk_rows):
            chunk = slice(start, start + chunk_rows)
            losses[chunk] = F.cross_entropy(
                _logits(rows[chunk], weights).float(), targets[chunk], reduction="none"
            )
        ctx.save_for_backward(rows, targets, *weights)
        ctx.chunk_rows = chunk_rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        rows, targets, *weights = ctx.saved_tensors
        need_rows, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[3:]
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weights = [
            torch.zeros_like(w) if need else None for w, need in zip(weights, need_weights, strict=True)
        ]
        sizes = [w.shape[0] for w in weights]
        for start in range(0, rows.shape[0], ctx.chunk_rows):
            chunk = slice(start, start + ctx.chunk_rows)
            r, t = rows[chunk], targets[chunk]
            # d CE / d logits = softmax - onehot(target), times each row's incoming gradient, computed
            # in place in the one fp32 copy of the chunk's logits (the chunk's whole working set).
            grad = _logits(r, weights).float()
            grad.sub_(grad.logsumexp(dim=-1, keepdim=True)).exp_()
            grad[torch.arange(t.shape[0], device=t.device), t] -= 1
            grad = grad.mul_(grad_losses[chunk].unsqueeze(1)).to(r.dtype)
            parts = grad.split(sizes, dim=-1)
            if need_rows:
                grad_rows[chunk] = sum(part @ w for part, w in zip(parts, weights, strict=True))
            for buffer, part in zip(grad_weights, parts, strict=True):
                if buffer is not None:
                    buffer.addmm_(part.t(), r)
            del grad, parts  # before the next chunk's logits: one chunk's working set at a time
        return grad_rows, None, None, *grad_weights


def _logits(rows: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([F.linear(rows, w) for w in weights], dim=-1)


class UnifiedHeadLoss(nn.Module):
    """The unified-vocabulary head (text rows, then the new rows) and cross-entropy on gathered rows.

    Parameterless on purpose: it reads the two head weights inside its own forward, and is called once
    per micro-batch. Under ZeRO-3 DeepSpeed then registers them as this module's external parameters
    and gathers them once for its forward and once for its backward, however many chunks run (calling
    the head modules once per chunk would make the number of gathers depend on each rank's label
    count, and ranks would wait on each other's collectives).
    """

    def __init__(self, chunk_rows: int = LOSS_CHUNK_ROWS):
        super().__init__()
        self.chunk_rows = chunk_rows

    def forward(
        self,
        rows: torch.Tensor,
        targets: torch.Tensor,
        head_weights: Callable[[], Sequence[torch.Tensor]],
    ) -> torch.Tensor:
        """Per-row losses [N] fp32 of `rows` [N, d] against `targets` [N]; `head_weights` returns the
        head's weight matrices in vocabulary order."""
        return _HeadCrossEntropy.apply(rows, targets, self.chunk_rows, *head_weights())
