"""Hybrid sequence assembly: expand image placeholders into discrete and continuous visual tokens.

Per image, in this order (DESIGN §1)::

    <img> c_1 ... c_K </img>   p_1 ... p_m
    '---- discrete view ----'  '- continuous view (kept patches, raster order) -'

Either view can be left out (stage 2 uses only the discrete one, stage 3 only the continuous one).
Visual positions never carry a label.
"""

from __future__ import annotations

import torch

from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID


def assemble_sequences(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    embed: callable,
    visual_embeds: torch.Tensor,
    pad_embed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace each placeholder with its image's visual embeddings; re-pad on the right.

    Args:
        input_ids, labels, attention_mask: [B, T] right-padded text with placeholders.
        embed: maps token ids [*] to embeddings [*, d].
        visual_embeds: [N, V, d], one block per image in batch order.

    Returns:
        inputs_embeds [B, T', d], labels [B, T'], attention_mask [B, T'].
    """
    num_placeholders = int((input_ids == IMAGE_PLACEHOLDER_ID).sum())
    if num_placeholders != visual_embeds.shape[0]:
        raise ValueError(
            f"batch has {num_placeholders} image placeholders but {visual_embeds.shape[0]} images"
        )
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
        out_e[b, : e.shape[0]] = e
        if pad_embed is not None:
            out_e[b, e.shape[0] :] = pad_embed
        out_l[b, : lab.shape[0]] = lab
        out_m[b, : e.shape[0]] = 1
    return out_e, out_l, out_m
