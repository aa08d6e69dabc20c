"""Peak memory of the LM loss at 7B shapes, as the two backends compute it from the labelled rows only.

One loss forward + backward on the 7B head (hidden 4096; text vocabulary 32000 + 8192 codes + 2
specials, padded to 40320 rows, as Vicuna-7B with the SEED codebook), from hidden states [B, T, 4096]
with a fraction of positions labelled, in two ways, in this process:

    checkpointed  chunks under torch.utils.checkpoint (``chunked_token_losses``: the 3D output stage's way,
                  with its megatron head)
    fused         what MavenModel trains with (``UnifiedHeadLoss``): one autograd function that
                  recomputes each chunk in backward and adds into one weight-gradient buffer

Peak bytes are the CPU allocator's high-water mark above the start of each run (torch.profiler's
allocation events carry the allocator's running total), so they count the logits, the softmax, their
gradients and the head's weight gradients, not the weights or hidden states that exist before. Two
batch sizes are measured and each way's peak extrapolated linearly to ``--extrapolate`` rows: a chunked
peak is a constant (one chunk's working set) plus the linear terms of the hidden-state gradient and the
gathered rows, once both sizes run more than one chunk (the default sizes do: ~2048 and ~3072 labelled
rows, chunks of 1024). The former loss (every position's logits) and its numbers are in
docs/performance.md.

    python bench/loss_memory.py [--batch-sizes 2,3] [--seq 2048] [--labelled 0.5] [--chunk-rows 1024] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

from maven_dist.contract.vocab import IGNORE_INDEX
from maven_dist.model.lm_loss import LOSS_CHUNK_ROWS, UnifiedHeadLoss, chunked_token_losses, labelled_rows

try:  # run as a script, bench/ is on sys.path; imported from the repository root (tests), it is not
    import harness
except ModuleNotFoundError:
    from bench import harness

GiB = 2**30


def peak_bytes(fn: Callable[[], None]) -> tuple[int, float]:
    """(allocator high-water mark above its level when `fn` starts, seconds) of one call."""
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    seconds = time.perf_counter() - start
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation:
            fields = node.typed[1]
            allocations.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
    allocations.sort()
    before = allocations[0][2] - allocations[0][1]
    return max(total for _, _, total in allocations) - before, seconds


def checkpointed(hidden, labels, heads, chunk_rows: int) -> torch.Tensor:
    rows, targets = labelled_rows(hidden, labels)

    def chunk_loss(r, t):
        return F.cross_entropy(torch.cat([head(r) for head in heads], dim=-1).float(), t, reduction="none")

    return chunked_token_losses(rows, targets, chunk_loss, chunk_rows).sum() / max(rows.shape[0], 1)


def fused(hidden, labels, heads, chunk_rows: int) -> torch.Tensor:
    rows, targets = labelled_rows(hidden, labels)
    loss = UnifiedHeadLoss(chunk_rows)(rows, targets, lambda: [h.weight for h in heads])
    return loss.sum() / max(rows.shape[0], 1)


WAYS = {"checkpointed": checkpointed, "fused": fused}


def run_way(way, hidden, labels, heads, chunk_rows: int, losses: dict[str, float]) -> None:
    """One loss forward and backward; the loss value into ``losses[way's name]``."""
    loss = way(hidden, labels, heads, chunk_rows)
    loss.backward()
    losses[way.__name__] = float(loss.detach())


def main(argv: list[str] | None = None) -> dict:
    """Run the bench; returns its figures: per way, the peak GiB at each batch size, extrapolated, and the
    seconds at the last size; how closely the ways' losses agree."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="2,3", help="rows per micro-batch, measured (two or more)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--labelled", type=float, default=0.5, help="fraction of positions with a label")
    p.add_argument("--chunk-rows", type=int, default=LOSS_CHUNK_ROWS)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--extrapolate", type=int, default=16, help="rows to extrapolate the peaks to")
    p.add_argument("--hidden", type=int, default=4096, help="the LLM's width (Vicuna-7B's)")
    p.add_argument("--vocab", default="32000,8320", help="head rows: text, new (8192 codes + 2, padded)")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    rows = [int(n) for n in args.vocab.split(",")]
    heads = [nn.Linear(args.hidden, n, bias=False, dtype=dtype) for n in rows]
    print(f"hardware: {harness.hardware()}")
    print(f"head {args.hidden} x {sum(rows)} ({args.dtype} weights, fp32 logits), T={args.seq}, "
          f"{args.labelled:.0%} of positions labelled, chunk {args.chunk_rows} rows")  # fmt: skip
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    peaks: dict[str, list[float]] = {w: [] for w in WAYS}
    seconds: dict[str, float] = {}
    spread = 0.0
    for b in sizes:
        hidden = torch.randn(b, args.seq, args.hidden, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, sum(rows), (b, args.seq))
        labels[torch.rand(b, args.seq) >= args.labelled] = IGNORE_INDEX
        losses = {}
        for name, way in WAYS.items():
            for tensor in [hidden, *(h.weight for h in heads)]:
                tensor.grad = None

            peak, seconds[name] = peak_bytes(
                partial(run_way, way, hidden, labels, heads, args.chunk_rows, losses)
            )
            peaks[name].append(peak / GiB)
            print(
                f"B={b:3d}  {name:12s} peak {peak / GiB:7.2f} GiB  {seconds[name]:6.1f} s  loss {losses[name]:.6f}"
            )
        spread = max(spread, max(losses.values()) - min(losses.values()))
    print(f"losses agree within {spread:.1e}")
    (b0, b1), n = sizes[:2], args.extrapolate
    extrapolated = {k: v[0] + (v[1] - v[0]) * (n - b0) / (b1 - b0) for k, v in peaks.items()}
    print(f"linear extrapolation to B={n} (from B={b0} and B={b1}): "
          + "  ".join(f"{k} {v:.2f} GiB" for k, v in extrapolated.items()))  # fmt: skip
    return {
        "peak_gib": peaks,
        "extrapolated_gib": extrapolated,
        "seconds": seconds,
        "losses_agree_within": spread,
    }


if __name__ == "__main__":
    main()
