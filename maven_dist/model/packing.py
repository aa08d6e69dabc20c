"""Packed rows (``data.packing``): each sample's positions restart at 0 and it attends to itself only.

A packed micro-batch holds several samples per row (``Batch.segment_ids`` says which token is whose).
For the LLM to compute exactly what it computes on the samples one per row, two things change:

* **positions** restart at 0 at every sample (RoPE sees the offsets it would see unpacked);
* **attention** stays inside each sample: the causal mask becomes block-diagonal.

How the second is told to the LLM depends on the kernel (``model.llm.attn_implementation``):

* ``sdpa`` / ``eager``: a 4D mask [B, 1, T, T] built here (transformers passes a 4D mask through to
  the kernel unchanged). Dense: the kernel still computes every row's T x T scores and masks most of
  them, so attention costs what a full row of T costs (docs/performance.md, "Sequence packing").
* ``flash_attention_2``: no mask at all; the rows go end to end into one and flash-attn's varlen kernel
  gets the samples' cumulative lengths (``cu_seqlens``, once per micro-batch: :func:`varlen_hidden_states`),
  which computes each sample's own scores only.

A row's padding (-1) is a run of its own: its positions restart too and it attends to itself, so no
query is left without a key (a fully masked softmax row would be NaN, and NaN survives ``0 *``).

Padded micro-batches (``data.packing: false``, the GPU recipes) use the same varlen layout under
flash-attn: :func:`unpadded_hidden_states` lays the real tokens of all rows end to end once per
micro-batch, where transformers would unpad the batch again in every layer.
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
        # starts at 0), padding runs included.
        rows, length, width = embeds.shape
        flat = varlen_hidden_states(
            decoder, embeds.reshape(1, rows * length, width), position_ids.reshape(1, rows * length)
        )
        return flat.reshape(rows, length, -1)
    mask = block_causal_mask(segment_ids, embeds.dtype, additive=attn_implementation == "eager")
    return decoder(
        inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state


def unpadded_hidden_states(
    decoder: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The last-layer states [B, T, d] of a flash-attn decoder over right-padded rows `embeds` [B, T, d]
    (`attention_mask` [B, T]: 1 on real tokens), computed on the real tokens only; 0 at padding.

    Why: handed a padding mask, transformers' flash-attn path unpads the batch in every layer
    (``modeling_flash_attention_utils._upad_input``: a ``nonzero()`` and an ``.item()`` per layer, host
    syncs on a GPU, again in the recomputation). Here the real tokens of all rows go end to end into one
    row [1, N, d] once per micro-batch, each row a sample of :func:`varlen_hidden_states`. Positions
    restart at 0 at every row: what the padded call gives a right-padded row's real tokens (0, 1, ...,
    its ``arange``), so every real token's state is the padded call's. Training batches are right-padded
    (``MavenFrontEnd.sequence_inputs``); left padding would shift the positions.
    """
    rows, length, width = embeds.shape
    real = attention_mask.bool()
    row_of = torch.arange(rows, device=real.device).unsqueeze(1).expand(rows, length)
    segment_ids = torch.where(real, row_of, -1)  # each row one sample, its padding a run of its own
    keep = real.reshape(-1).nonzero().squeeze(1)  # the real tokens' flat indices (one host sync)
    position_ids = packed_position_ids(segment_ids).reshape(-1).index_select(0, keep).unsqueeze(0)
    flat = varlen_hidden_states(
        decoder, embeds.reshape(-1, width).index_select(0, keep).unsqueeze(0), position_ids
    )
    out = flat.new_zeros(rows * length, flat.shape[-1]).index_copy(0, keep, flat[0])
    return out.reshape(rows, length, -1)


def varlen_hidden_states(
    decoder: nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """The last-layer states [1, N, d] of a decoder over samples laid end to end in one row `embeds`
    [1, N, d], each sample's `position_ids` [1, N] counting from 0; no mask.

    Under flash-attn the sample boundaries go in once per micro-batch (``varlen_kwargs``): left to itself
    transformers re-derives them from the position ids in every layer
    (``modeling_flash_attention_utils._is_packed_sequence``, then ``prepare_fa_kwargs_from_position_ids``: a
    ``nonzero()`` and a ``max()`` per layer, again in the recomputation). sdpa and eager ignore those
    arguments and build a block-causal mask from the restarting positions
    (``masking_utils.find_packed_sequence_indices``), which is how the CPU tests check this layout.
    """
    return decoder(
        inputs_embeds=embeds,
        position_ids=position_ids,
        attention_mask=None,
        use_cache=False,
        **varlen_kwargs(position_ids),
    ).last_hidden_state
