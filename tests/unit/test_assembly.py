"""Vectorised hybrid assembly: bitwise the former per-sample loop, on every shape of batch."""

from __future__ import annotations

import pytest
import torch

from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from maven_dist.model.assembly import assemble_sequences

D, VOCAB = 6, 50


def loop_assembly(input_ids, labels, attention_mask, embed, visual_embeds, padding_side="right"):
    """The assembly before issue 16, copied as it was: a Python loop over samples and images."""
    if labels is None:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        keep_labels = False
    else:
        keep_labels = True
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
    return out_e, out_l if keep_labels else None, out_m


def padded(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, labels (text labelled, placeholders not) and mask of `rows`, padded on `side`."""
    width = max(len(r) for r in rows) + 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        where = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[b, where] = torch.tensor(row, dtype=torch.long)
        mask[b, where] = 1
    labels = torch.where((ids == IMAGE_PLACEHOLDER_ID) | (mask == 0), IGNORE_INDEX, ids)
    return ids, labels, mask


P = IMAGE_PLACEHOLDER_ID
BATCHES = {
    "text only": [[1, 5, 6, 7], [1, 8]],
    "one image each, different lengths": [[1, P, 5, 6, 7, 2], [1, 9, P, 2], [1, 3, 4, 5, 6, 7, 8, P]],
    "multi-image and text-only rows": [
        [1, P, 5, P, 6, 2],
        [1, 4, 4, 2],
        [P, P, P],
        [1, 7, P, 8, 9, 10, 11, 2],
    ],
    "a row of one placeholder": [[P], [1, 2, 3, 4, 5, 6]],
}
# Views: discrete only (K + 2 = 4 positions), continuous only (m = 3), both (7).
VIEW_WIDTHS = {"discrete": 4, "continuous": 3, "both": 7}


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("input_side", ["right", "left"])
@pytest.mark.parametrize("views", list(VIEW_WIDTHS))
@pytest.mark.parametrize("case", list(BATCHES))
def test_bitwise_the_per_sample_loop(case, views, input_side, padding_side):
    g = torch.Generator().manual_seed(0)
    ids, labels, mask = padded(BATCHES[case], input_side)
    table = torch.nn.Embedding(VOCAB, D)
    images = int((ids == P).sum())
    visual = torch.randn(images, VIEW_WIDTHS[views], D, generator=g, requires_grad=True)
    for with_labels in (True, False):
        got = assemble_sequences(ids, labels if with_labels else None, mask, table, visual, padding_side)
        want = loop_assembly(ids, labels if with_labels else None, mask, table, visual, padding_side)
        for a, b in zip(got, want, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b)
    # The gradients reach the same embedding rows and visual blocks, to the bit.
    weights = torch.randn(got[0].shape, generator=g)
    grads = []
    for fn in (assemble_sequences, loop_assembly):
        table.zero_grad(set_to_none=True)
        visual.grad = None
        (fn(ids, labels, mask, table, visual, padding_side)[0] * weights).sum().backward()
        # (Without images the loop never touched `visual`: no gradient rather than an empty one.)
        grads.append(
            (table.weight.grad.clone(), torch.zeros_like(visual) if visual.grad is None else visual.grad)
        )
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_mixed_dtypes_cast_as_before():
    """bf16 visual blocks with fp32 text embeddings: the output has the visual dtype, as before."""
    ids, labels, mask = padded(BATCHES["multi-image and text-only rows"], "right")
    table = torch.nn.Embedding(VOCAB, D)
    visual = torch.randn(int((ids == P).sum()), 5, D).to(torch.bfloat16)
    got = assemble_sequences(ids, labels, mask, table, visual)
    want = loop_assembly(ids, labels, mask, table, visual)
    assert got[0].dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_a_placeholder_count_that_differs_from_the_images_is_refused():
    ids, labels, mask = padded(BATCHES["one image each, different lengths"], "right")
    with pytest.raises(ValueError, match="3 image placeholders but 2 images"):
        assemble_sequences(ids, labels, mask, torch.nn.Embedding(VOCAB, D), torch.zeros(2, 4, D))
