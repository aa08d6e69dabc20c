"""Hybrid sequence assembly: the vectorised ``assemble_sequences`` against the former per-sample loop.

A stage-4-shaped micro-batch (``--rows`` conversations of ~``--text`` text tokens, one to three images
each, 34 discrete + 144 continuous positions per image, width ``--hidden``), assembled both ways in this
process; the outputs are checked equal to the bit, then each way is timed (median of ``--repeat``).

    python bench/assembly.py [--rows 16] [--text 600] [--hidden 4096] [--repeat 5]

CPU only here; on a GPU the loop's cost is mostly its host synchronisations (a ``.tolist()`` and a
``torch.cat`` per sample), which the vectorised version replaces with three per micro-batch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from maven_dist.model.assembly import assemble_sequences

try:  # run as a script, bench/ is on sys.path; imported from the repository root (tests), it is not
    from _hardware import hardware
except ModuleNotFoundError:
    from bench._hardware import hardware


def loop_assembly(input_ids, labels, attention_mask, embed, visual_embeds, padding_side="right"):
    """The assembly before issue 16 (the baseline): a Python loop over samples and images."""
    d = visual_embeds.shape[-1]
    text_embeds = embed(input_ids.clamp(min=0))
    rows_embeds, rows_labels = [], []
    image = 0
    for b in range(input_ids.shape[0]):
        valid = attention_mask[b].bool()
        ids, lab, emb = input_ids[b][valid], labels[b][valid], text_embeds[b][valid]
        cuts = (ids == IMAGE_PLACEHOLDER_ID).nonzero().flatten().tolist()
        pieces_e, pieces_l, start = [], [], 0
        for cut in cuts:
            pieces_e += [emb[start:cut], visual_embeds[image]]
            pieces_l += [lab[start:cut], lab.new_full((visual_embeds.shape[1],), IGNORE_INDEX)]
            image, start = image + 1, cut + 1
        pieces_e.append(emb[start:])
        pieces_l.append(lab[start:])
        rows_embeds.append(torch.cat(pieces_e))
        rows_labels.append(torch.cat(pieces_l))
    length = max(r.shape[0] for r in rows_embeds)
    out_e = visual_embeds.new_zeros(len(rows_embeds), length, d)
    out_l = labels.new_full((len(rows_embeds), length), IGNORE_INDEX)
    out_m = attention_mask.new_zeros(len(rows_embeds), length)
    for b, (e, lab) in enumerate(zip(rows_embeds, rows_labels, strict=True)):
        where = slice(0, e.shape[0]) if padding_side == "right" else slice(length - e.shape[0], length)
        out_e[b, where] = e
        out_l[b, where] = lab
        out_m[b, where] = 1
    return out_e, out_l, out_m


def make_batch(rows: int, text: int, hidden: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(text // 2, text * 3 // 2, (rows,), generator=g)
    width = int(lengths.max())
    ids = torch.randint(3, 32000, (rows, width), generator=g)
    mask = (torch.arange(width) < lengths.unsqueeze(1)).long()
    images = 0
    for b in range(rows):
        n = int(torch.randint(1, 4, (1,), generator=g))
        where = torch.randperm(int(lengths[b]) - 1, generator=g)[:n] + 1
        ids[b, where] = IMAGE_PLACEHOLDER_ID
        images += n
    labels = torch.where((ids == IMAGE_PLACEHOLDER_ID) | (mask == 0), IGNORE_INDEX, ids)
    visual = torch.randn(images, 34 + 144, hidden, generator=g)
    return ids, labels, mask, visual


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--text", type=int, default=600, help="mean text tokens per row")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    ids, labels, mask, visual = make_batch(args.rows, args.text, args.hidden)
    table = torch.nn.Embedding(32000, args.hidden)
    print(f"hardware: {hardware()}")
    print(
        f"{args.rows} rows, {visual.shape[0]} images x {visual.shape[1]} visual positions, width {args.hidden}"
    )
    with torch.no_grad():
        new = assemble_sequences(ids, labels, mask, table, visual)
        old = loop_assembly(ids, labels, mask, table, visual)
        assert all(torch.equal(a, b) for a, b in zip(new, old, strict=True)), "outputs differ"
        print(f"assembled length {new[0].shape[1]}; outputs bitwise equal")
        times = {}
        for name, fn in (("per-sample loop", loop_assembly), ("vectorised", assemble_sequences)):
            runs = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                fn(ids, labels, mask, table, visual)
                runs.append(time.perf_counter() - start)
            times[name] = statistics.median(runs)
            print(f"{name:16s} {times[name] * 1e3:8.1f} ms (median of {args.repeat})")
    print(f"per-sample loop / vectorised = {times['per-sample loop'] / times['vectorised']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
