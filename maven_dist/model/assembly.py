"""Hybrid sequence assembly: expand image placeholders into discrete and continuous visual tokens.

Per image, in this order (DESIGN §1)::

    <img> c_1 ... c_K </img>   p_1 ... p_m
    '---- discrete view ----'  '- continuous view (kept patches, raster order) -'

Either view can be left out (stage 2 uses only the discrete one, stage 3 only the continuous one).
Visual positions never carry a label.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID


def assemble_sequences(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    visual_embeds: torch.Tensor,
    padding_side: Literal["right", "left"] = "right",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Replace each placeholder with its image's visual embeddings; re-pad.

    Args:
        input_ids, labels, attention_mask: [B, T] padded text with placeholders (labels may be None:
            inference); the padding may be on either side, only ``attention_mask`` says where it is.
        embed: maps token ids [*] to embeddings [*, d].
        visual_embeds: [N, V, d], one block per image in batch order.
        padding_side: where the output puts its padding: right for training, left for generation
            (every row's last position is then its last real token).

    Returns:
        inputs_embeds [B, T', d], labels [B, T'] (or None), attention_mask [B, T'].
    """
    num_placeholders = int((input_ids == IMAGE_PLACEHOLDER_ID).sum())
    if num_placeholders != visual_embeds.shape[0]:
        raise ValueError(
            f"batch has {num_placeholders} image placeholders but {visual_embeds.shape[0]} images"
        )
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
