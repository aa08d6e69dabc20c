"""The MaVEn front end, written once: how images and token ids become the LLM's input sequence.

``MavenModel`` (the HF LLaMA: one process and ZeRO-3) and the 3D backend's first pipeline stage
(megatron-core vocabulary-parallel embeddings) both inherit :class:`MavenFrontEnd`. They differ only in
their *parts*: the two embedding tables of the unified vocabulary (:meth:`~MavenFrontEnd.text_embedding`,
:meth:`~MavenFrontEnd.new_row_embedding`) and where h_eos comes from (the ``eos_states`` callable: the
LLM itself, or the 3D engine's forward-only pipeline pass). Everything that decides what the LLM sees
is here::

    unified embedding   ids < text_size -> the LLM's text rows, else the new rows (specials, codes, padding)
    discrete block      <img> c_1 .. c_K </img>
    h_eos input         <s> <img> c_1 .. c_K </img> </s>; h_eos = the last-layer (final-norm) state at </s>
    patch selection     the top floor(alpha * N) selector scores, kept in raster order; alpha = 1 keeps
                        every patch, so neither the selector nor the h_eos pass runs
    visual block        the discrete block, then the projected kept patches (as ``stage.views`` says)
    assembly            each <image> placeholder replaced by its image's block; visual positions unlabelled
    blank-image rule    a micro-batch without images runs one blank image with weight 0
    packed rows         ``Batch.segment_ids`` follow their tokens into the assembled positions, and every
                        sample's first position is unlabelled (``maven_dist/model/packing.py``)

**The h_eos pass starts with BOS.** Every sequence the LLM is trained on in stages 2 and 4 starts with
``<s>``, and LLaMA-family models put a large share of attention on the first position (the "attention
sink"); a block fed without it would make ``<img>`` that sink and give states from outside the
distribution the LLM is trained in. ``tests/unit/test_frontend.py`` pins the exact ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import CLIPVisionModel

from maven_dist.contract.batch import Batch
from maven_dist.contract.lengths import image_tokens, num_kept_patches
from maven_dist.contract.vocab import VocabLayout
from maven_dist.model.assembly import assemble_segment_ids, assemble_sequences
from maven_dist.model.packing import ignore_sample_starts
from maven_dist.model.projector import build_projector
from maven_dist.model.selector import PatchSelector, select_top_patches
from maven_dist.model.spec import MavenSpec
from maven_dist.model.vision import ContinuousEncoder

EosStates = Callable[[torch.Tensor], torch.Tensor]
"""image codes [N, K] -> h_eos [N, d]."""


@dataclass
class SequenceInputs:
    """What the LLM's decoder consumes for one micro-batch."""

    embeds: torch.Tensor
    """[B, T, d] assembled input embeddings."""
    labels: torch.Tensor | None
    """[B, T] targets (IGNORE_INDEX on visual and padding positions); None when the batch has none."""
    attention_mask: torch.Tensor
    """[B, T] 1 for real positions."""
    h_eos: torch.Tensor | None
    """[N, d] the real images' h_eos when the selector ran (None otherwise): for ``selector/h_eos_spread``."""
    segment_ids: torch.Tensor | None = None
    """[B, T] packed batches only: the sample each position belongs to, -1 on padding."""


class MavenFrontEnd(nn.Module):
    """Base of every module that turns a :class:`Batch` into LLM inputs (see the module doc).

    Owns the continuous view's parameters (``vision_tower``, ``selector``, ``projector``); subclasses
    provide the two embedding tables and register them under their own names.
    """

    def __init__(self, tower: CLIPVisionModel, layout: VocabLayout, spec: MavenSpec, llm_width: int):
        super().__init__()
        self.layout = layout
        self.spec = spec
        self.vision_tower = ContinuousEncoder(tower, spec.select_layer)
        feature = self.vision_tower.hidden_size
        self.selector = PatchSelector(feature, llm_width, spec.selector_hidden_size)
        self.projector = build_projector(spec.projector, feature, llm_width)

    # ------------------------------------------------------------------ parts (subclasses)

    def text_embedding(self) -> nn.Module:
        """The text rows [0, text_size) of the unified vocabulary: ids -> embeddings."""
        raise NotImplementedError

    def new_row_embedding(self) -> nn.Module:
        """The new rows [text_size, padded_size), indexed from 0."""
        raise NotImplementedError

    # ------------------------------------------------------------------ tokens

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Unified-vocabulary embedding lookup: text rows below ``text_size``, new rows from there on."""
        text_size = self.layout.text_size
        is_text = (ids < text_size).unsqueeze(-1)
        text = self.text_embedding()(ids.clamp(max=text_size - 1))
        new = self.new_row_embedding()((ids - text_size).clamp(min=0))
        return torch.where(is_text, text, new)

    def discrete_ids(self, image_codes: torch.Tensor) -> torch.Tensor:
        """[N, K] codes -> [N, K + 2] token ids ``<img> c_1 .. c_K </img>``."""
        n = image_codes.shape[0]
        start = image_codes.new_full((n, 1), self.layout.img_start_id)
        end = image_codes.new_full((n, 1), self.layout.img_end_id)
        return torch.cat([start, self.layout.code_to_token_id(image_codes), end], dim=1)

    def eos_input_ids(self, image_codes: torch.Tensor) -> torch.Tensor:
        """[N, K + 3 or K + 4] the h_eos pass's input: ``<s>`` (if the tokenizer has one), the discrete
        block, ``</s>``; h_eos is the state at the last position."""
        ids = self.discrete_ids(image_codes)
        n = ids.shape[0]
        pieces = [ids, ids.new_full((n, 1), self.spec.eos_token_id)]
        if self.spec.bos_token_id is not None:
            pieces.insert(0, ids.new_full((n, 1), self.spec.bos_token_id))
        return torch.cat(pieces, dim=1)

    # ------------------------------------------------------------------ the continuous view

    @property
    def num_kept(self) -> int:
        return num_kept_patches(self.vision_tower.num_patches, self.spec.keep_ratio)

    def selects_patches(self, views: Sequence[str]) -> bool:
        """Whether the selector (and so the h_eos pass) runs: the continuous view is used and alpha < 1."""
        return "continuous" in views and self.num_kept < self.vision_tower.num_patches

    def visual_tokens_per_image(self, views: Sequence[str]) -> int:
        """Codes plus kept patches of one image (the paper's count, 176 at alpha = 0.25: the sequence adds
        ``<img>`` and ``</img>``)."""
        return image_tokens(self.spec.num_codes, self.vision_tower.num_patches, self.spec.keep_ratio, views)

    def selected_patches(self, features: torch.Tensor, h_eos: torch.Tensor) -> torch.Tensor:
        """[N, m] indices of the patches the selector keeps for these features and h_eos, ascending."""
        return select_top_patches(self.selector(features, h_eos), self.num_kept)

    def kept_patches(self, features: torch.Tensor, h_eos: torch.Tensor | None) -> torch.Tensor:
        """[N, m, f]: the patches the selector keeps, in raster order (all of them at alpha = 1)."""
        if h_eos is None:
            return features
        keep = self.selected_patches(features, h_eos)
        return features.gather(1, keep.unsqueeze(-1).expand(-1, -1, features.shape[-1]))

    def visual_embeds(
        self,
        pixel_values: torch.Tensor,
        image_codes: torch.Tensor,
        h_eos: torch.Tensor | None,
        views: Sequence[str],
    ) -> torch.Tensor:
        """[N, V, d]: each image's discrete block, then its kept, projected patches (per `views`)."""
        blocks = []
        if "discrete" in views:
            blocks.append(self.embed_tokens(self.discrete_ids(image_codes)))
        if "continuous" in views:
            kept = self.kept_patches(self.vision_tower(pixel_values), h_eos)
            blocks.append(self.projector(kept.to(self.projector_dtype)))
        return torch.cat(blocks, dim=1)

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    # ------------------------------------------------------------------ the whole sequence

    def sequence_inputs(
        self,
        batch: Batch,
        views: Sequence[str],
        eos_states: EosStates,
        padding_side: Literal["right", "left"] = "right",
    ) -> SequenceInputs:
        """Assemble `batch` into decoder inputs; `eos_states` is called once, on every image of the batch.
        Training pads on the right; generation on the left (``padding_side``)."""
        pixel_values, image_codes = batch.pixel_values, batch.image_codes
        has_images = pixel_values.shape[0] > 0
        if not has_images:
            # Every rank must run the same modules (ZeRO-3 gathers parameters collectively, the 3D
            # stages exchange activations), and every trainable part needs a gradient, so a text-only
            # micro-batch runs the visual path on one blank image and adds it with weight 0.
            pixel_values = pixel_values.new_zeros(1, *pixel_values.shape[1:])
            image_codes = image_codes.new_zeros(1, self.spec.num_codes)
        h_eos = eos_states(image_codes) if self.selects_patches(views) else None
        visual = self.visual_embeds(pixel_values, image_codes, h_eos, views)
        embeds, labels, mask = assemble_sequences(
            batch.input_ids,
            batch.labels,
            batch.attention_mask,
            self.embed_tokens,
            visual if has_images else visual[:0],
            padding_side,
        )
        if not has_images:
            embeds = embeds + 0.0 * visual.sum()
        segments = None
        if batch.segment_ids is not None:
            if padding_side != "right":
                raise ValueError("packed batches are for training: they are assembled right-padded")
            segments = assemble_segment_ids(
                batch.input_ids, batch.attention_mask, batch.segment_ids, visual.shape[1]
            )
            labels = None if labels is None else ignore_sample_starts(labels, segments)
        return SequenceInputs(embeds, labels, mask, h_eos if has_images else None, segments)


def precomputed_eos_states(h_eos: torch.Tensor) -> EosStates:
    """An ``eos_states`` that hands back h_eos computed beforehand for exactly the batch's images (the 3D
    engine's pipeline pass; the other engines' pass per step, or their cache). The blank image of a
    text-only micro-batch (weight 0: it changes neither loss nor gradients) gets zeros, as no pass saw it."""

    def eos_states(codes: torch.Tensor) -> torch.Tensor:
        if h_eos.shape[0] == codes.shape[0]:
            return h_eos
        if h_eos.shape[0] == 0:
            return h_eos.new_zeros(codes.shape[0], h_eos.shape[1])
        raise ValueError(f"h_eos of {h_eos.shape[0]} images for a batch of {codes.shape[0]}")

    return eos_states


def eos_input_length(spec: MavenSpec) -> int:
    """Positions of one image's h_eos input (``MavenFrontEnd.eos_input_ids``), known without the
    embedding: later pipeline stages allocate their receive buffers with it."""
    return spec.num_codes + 3 + (spec.bos_token_id is not None)


def h_eos_spread(h_eos: torch.Tensor) -> torch.Tensor | None:
    """``selector/h_eos_spread``: the mean over hidden dimensions of h_eos's standard deviation across
    images, over h_eos's root mean square. 0 when h_eos ignores the image; None for fewer than 2 images."""
    if h_eos is None or h_eos.shape[0] < 2:
        return None
    h = h_eos.detach().float()
    return h.std(dim=0, correction=0).mean() / h.pow(2).mean().sqrt().clamp(min=1e-12)
