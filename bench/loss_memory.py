"""Peak memory of the LM loss at 7B shapes: every position's logits (the former loss) vs labelled rows only.

One loss forward + backward on the 7B head (hidden 4096; text vocabulary 32000 + 8192 codes + 2
specials, padded to 40320 rows, as Vicuna-7B with the SEED codebook), from hidden states [B, T, 4096]
with a fraction of positions labelled, in four ways, in this process:

    all positions       the former loss: fp32 logits [B, T, V], ignore_index cross-entropy
    labelled, chunked   labelled rows gathered, head + CE per chunk, no checkpoint (backward keeps
                        every chunk's softmax)
    labelled, ckpt      chunks under torch.utils.checkpoint (``chunked_token_losses``: the 3D output
                        stage's way, with its megatron head)
    labelled, fused     what MavenModel trains with (``UnifiedHeadLoss``): one autograd function that
                        recomputes each chunk in backward and adds into one weight-gradient buffer

Peak bytes are the CPU allocator's high-water mark above the start of each run (torch.profiler's
allocation events carry the allocator's running total), so they count the logits, the softmax, their
gradients and the head's weight gradients, not the weights or hidden states that exist before. A
16 x 2048 micro-batch takes too long on a CPU in the former way (and ~15 GiB), so two batch sizes
are measured and each way's peak extrapolated linearly to ``--extrapolate`` rows: the former peak is
linear in B * T; the chunked ones are a constant (one chunk's working set) plus the linear terms of
the hidden-state gradient and the gathered rows, once both sizes run more than one chunk (the
default sizes do: ~2048 and ~3072 labelled rows, chunks of 1024).

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
    from _hardware import hardware
except ModuleNotFoundError:
    from bench._hardware import hardware

TEXT_VOCAB, NEW_ROWS, HIDDEN = 32000, 8320, 4096  # 32000 + 8192 + 2 padded to a multiple of 128: 40320

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


def former_loss(hidden, labels, heads) -> torch.Tensor:
    """The loss before issue 16, as MavenModel.lm_forward computed it."""
    logits = torch.cat([head(hidden) for head in heads], dim=-1).float()[:, :-1]
    targets = labels[:, 1:]
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return token_loss.sum() / max(int((targets != IGNORE_INDEX).sum()), 1)


def chunked_without_checkpoint(hidden, labels, heads, chunk_rows: int) -> torch.Tensor:
    rows, targets = labelled_rows(hidden, labels)
    losses = []
    for start in range(0, max(rows.shape[0], 1), chunk_rows):
        r, t = rows[start : start + chunk_rows], targets[start : start + chunk_rows]
        logits = torch.cat([head(r) for head in heads], dim=-1).float()
        losses.append(F.cross_entropy(logits, t, reduction="none"))
    return torch.cat(losses).sum() / max(rows.shape[0], 1)


def checkpointed(hidden, labels, heads, chunk_rows: int) -> torch.Tensor:
    rows, targets = labelled_rows(hidden, labels)

    def chunk_loss(r, t):
        return F.cross_entropy(torch.cat([head(r) for head in heads], dim=-1).float(), t, reduction="none")

    return chunked_token_losses(rows, targets, chunk_loss, chunk_rows).sum() / max(rows.shape[0], 1)


def fused(hidden, labels, heads, chunk_rows: int) -> torch.Tensor:
    rows, targets = labelled_rows(hidden, labels)
    loss = UnifiedHeadLoss(chunk_rows)(rows, targets, lambda: [h.weight for h in heads])
    return loss.sum() / max(rows.shape[0], 1)


def run_way(way, name: str, hidden, labels, heads, losses: dict[str, float]) -> None:
    """One loss forward and backward; the loss value into `losses[name]`."""
    loss = way(hidden, labels, heads)
    loss.backward()
    losses[name] = float(loss.detach())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="2,3", help="rows per micro-batch, measured (two or more)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--labelled", type=float, default=0.5, help="fraction of positions with a label")
    p.add_argument("--chunk-rows", type=int, default=LOSS_CHUNK_ROWS)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--extrapolate", type=int, default=16, help="rows to extrapolate the peaks to")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    heads = [nn.Linear(HIDDEN, n, bias=False, dtype=dtype) for n in (TEXT_VOCAB, NEW_ROWS)]
    vocab = TEXT_VOCAB + NEW_ROWS
    ways = {
        "all positions": former_loss,
        "labelled, chunked": lambda h, lab, hd: chunked_without_checkpoint(h, lab, hd, args.chunk_rows),
        "labelled, ckpt": lambda h, lab, hd: checkpointed(h, lab, hd, args.chunk_rows),
        "labelled, fused": lambda h, lab, hd: fused(h, lab, hd, args.chunk_rows),
    }
    print(f"hardware: {hardware()}")
    print(
        f"head {HIDDEN} x {vocab} ({args.dtype} weights, fp32 logits), T={args.seq}, "
        f"{args.labelled:.0%} of positions labelled, chunk {args.chunk_rows} rows"
    )
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    peaks: dict[str, list[int]] = {w: [] for w in ways}
    for b in sizes:
        hidden = torch.randn(b, args.seq, HIDDEN, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, vocab, (b, args.seq))
        labels[torch.rand(b, args.seq) >= args.labelled] = IGNORE_INDEX
        losses = {}
        for name, way in ways.items():
            for module in heads:
                module.weight.grad = None
            hidden.grad = None

            peak, seconds = peak_bytes(partial(run_way, way, name, hidden, labels, heads, losses))
            peaks[name].append(peak)
            print(
                f"B={b:3d}  {name:18s} peak {peak / GiB:7.2f} GiB  {seconds:6.1f} s  loss {losses[name]:.6f}"
            )
        spread = max(losses.values()) - min(losses.values())
        print(f"       losses agree within {spread:.1e}")
    if len(sizes) >= 2:
        (b0, b1), n = sizes[:2], args.extrapolate
        print(f"linear extrapolation to B={n} (from B={b0} and B={b1}):")
        extrapolated = {k: v[0] + (v[1] - v[0]) * (n - b0) / (b1 - b0) for k, v in peaks.items()}
        for name, at_n in extrapolated.items():
            ratio = extrapolated["all positions"] / at_n
            print(f"       {name:18s} {at_n / GiB:7.2f} GiB  (all positions / this = {ratio:4.1f})")
    print(f"measured at B={sizes[-1]}:")
    for name in ways:
        ratio = peaks["all positions"][-1] / peaks[name][-1]
        print(f"       {name:18s} all positions / this = {ratio:4.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
