"""Packed rows (``data.packing``): each sample's positions restart at 0 and it attends to itself only.

A packed micro-batch holds several samples per row (``Batch.segment_ids`` says which token is whose).
For the LLM to compute exactly what it computes on the samples one per row, two things change:

* **positions** restart at 0 at every sample (RoPE sees the offsets it would see unpacked);
* **attention** stays inside each sample: the causal mask becomes block-diagonal.

How the second is told to the LLM depends on the kernel (``model.llm.attn_implementation``):

* ``sdpa`` / ``eager``: a 4D mask [B, 1, T, T] built here (transformers passes a 4D mask through to
  the kernel unchanged). Dense: the kernel still computes every row's T x T scores and masks most of
  them, so attention costs what a full row of T costs (docs/performance.md, "Sequence packing").
* ``flash_attention_2``: no mask at all; transformers reads the restarting position ids as packed
  sequences and calls flash-attn's varlen kernel with their cumulative lengths (``cu_seqlens``), which
  computes each sample's own scores only.

A row's padding (-1) is a run of its own: its positions restart too and it attends to itself, so no
query is left without a key (a fully masked softmax row would be NaN, and NaN survives ``0 *``).
"""

from __future__ import annotations

import torch
from torch import nn

from maven_dist.contract.vocab import IGNORE_INDEX


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: True at the first position of every run of equal ids (each sample, the padding)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def packed_position_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """long [B, T]: each position's offset from the start of its run (every sample counts from 0)."""
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    run_start = torch.where(segment_starts(segment_ids), index, 0).cummax(dim=1).values
    return index - run_start


def ignore_sample_starts(labels: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """`labels` with every sample's first position unlabelled: the token before it is the previous
    sample's last, which must not learn to predict it. One sample per row never has that label as a
    target (position 0 predicts nothing), so the labelled targets are the unpacked ones exactly."""
    return labels.masked_fill(segment_starts(segment_ids) & (segment_ids >= 0), IGNORE_INDEX)


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    """[B, 1, T, T]: query i may see key j when j <= i in the same run. Boolean (True: attend) for
    SDPA, or `additive` (0 or the dtype's minimum, added to the scores) for eager attention."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = ((segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)) & causal).unsqueeze(1)
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """flash-attn's varlen arguments for packed position ids [1, N] (transformers' FlashAttentionKwargs):
    the cumulative sample lengths, and the longest sample as a Python int (flash-attn takes an int)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(position_ids)
    longest = int(max_q)
    return {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": longest, "max_length_k": longest}


def packed_hidden_states(
    decoder: nn.Module, embeds: torch.Tensor, segment_ids: torch.Tensor, attn_implementation: str
) -> torch.Tensor:
    """The last-layer states [B, T, d] of a transformers decoder (``LlamaModel``) over packed rows
    `embeds` [B, T, d] with sample ids `segment_ids` [B, T] (assembled positions, -1 padding)."""
    position_ids = packed_position_ids(segment_ids)
    if attn_implementation == "flash_attention_2":
        # flash-attn's varlen kernel, with no mask, in a batch of one row: the rows are laid end to end (each
        # starts at 0). The sample boundaries go in once per micro-batch (one host sync for the longest
        # length): left to itself transformers re-derives them from the position ids in every layer
        # (modeling_flash_attention_utils._is_packed_sequence, then prepare_fa_kwargs_from_position_ids: a
        # nonzero() and a max() per layer, again in the recomputation).
        rows, length, width = embeds.shape
        flat_positions = position_ids.reshape(1, rows * length)
        hidden = decoder(
            inputs_embeds=embeds.reshape(1, rows * length, width),
            position_ids=flat_positions,
            attention_mask=None,
            use_cache=False,
            **varlen_kwargs(flat_positions),
        ).last_hidden_state
        return hidden.reshape(rows, length, -1)
    mask = block_causal_mask(segment_ids, embeds.dtype, additive=attn_implementation == "eager")
    return decoder(
        inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
