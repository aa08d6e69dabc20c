"""Hybrid sequence assembly: expand image placeholders into discrete and continuous visual tokens.

Per image, in this order (DESIGN §1)::

    <img> c_1 ... c_K </img>   p_1 ... p_m
    '---- discrete view ----'  '- continuous view (kept patches, raster order) -'

Either view can be left out (stage 2 uses only the discrete one, stage 3 only the continuous one).
Visual positions never carry a label.

The assembly is index arithmetic over the whole batch (a cumulative sum gives every token its output
position, two scatters place the text and the image blocks): no Python loop over samples or images,
and a few host synchronisations per micro-batch whatever its size (issue 16).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID


class _Layout:
    """Where every input token lands: the index arithmetic :func:`assemble_sequences` and
    :func:`assemble_segment_ids` share (so a token's sample id lands where its embedding does)."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_visual: int,
        padding_side: Literal["right", "left"],
    ) -> None:
        rows = input_ids.shape[0]
        valid = attention_mask.bool()
        self.is_image = valid & (input_ids == IMAGE_PLACEHOLDER_ID)
        self.is_text = valid & ~self.is_image
        # Each real token takes one output position, each placeholder its image's block; a token's first
        # output position is the number of positions taken before it in its row (after the left padding).
        width = torch.where(self.is_image, num_visual, self.is_text.long())
        self.row_length = width.sum(dim=1)
        self.length = int(self.row_length.max()) if rows else 0
        self.pad = (
            self.length - self.row_length if padding_side == "left" else torch.zeros_like(self.row_length)
        )
        self.first = width.cumsum(dim=1) - width + self.pad.unsqueeze(1)
        self.text_rows, self.text_cols = self.is_text.nonzero(as_tuple=True)
        # Images in batch order are the placeholders in row-major order (nonzero's order).
        self.image_rows, self.image_cols = self.is_image.nonzero(as_tuple=True)
        self.block = self.first[self.image_rows, self.image_cols].unsqueeze(1) + torch.arange(
            num_visual, device=self.first.device
        )

    @property
    def text_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_rows, self.first[self.text_rows, self.text_cols]

    @property
    def image_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_rows.unsqueeze(1).expand_as(self.block), self.block


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
    rows, num_visual, d = input_ids.shape[0], visual_embeds.shape[1], visual_embeds.shape[-1]
    at = _Layout(input_ids, attention_mask, num_visual, padding_side)
    length = at.length

    out_e = visual_embeds.new_zeros(rows, length, d)
    text_embeds = embed(input_ids[at.text_rows, at.text_cols].clamp(min=0))
    out_e[at.text_positions] = text_embeds.to(out_e.dtype)
    out_e[at.image_positions] = visual_embeds[: at.image_rows.shape[0]]

    positions = torch.arange(length, device=attention_mask.device)
    real = (positions >= at.pad.unsqueeze(1)) & (positions < (at.pad + at.row_length).unsqueeze(1))
    out_m = real.to(attention_mask.dtype)
    if labels is None:
        return out_e, None, out_m
    out_l = labels.new_full((rows, length), IGNORE_INDEX)
    out_l[at.text_positions] = labels[at.text_rows, at.text_cols]
    return out_e, out_l, out_m


def assemble_segment_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, segment_ids: torch.Tensor, num_visual: int
) -> torch.Tensor:
    """A packed batch's sample ids [B, T] (``Batch.segment_ids``) moved to the assembled, right-padded
    positions [B, T'] of :func:`assemble_sequences`: an image block takes its placeholder's sample,
    padding is -1."""
    at = _Layout(input_ids, attention_mask, num_visual, "right")
    out = segment_ids.new_full((input_ids.shape[0], at.length), -1)
    out[at.text_positions] = segment_ids[at.text_rows, at.text_cols]
    out[at.image_positions] = segment_ids[at.image_rows, at.image_cols].unsqueeze(1).expand_as(at.block)
    return out
