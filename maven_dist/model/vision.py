"""The continuous view: patch features from a frozen CLIP vision tower."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel


class ContinuousEncoder(nn.Module):
    """CLIP ViT patch features from `select_layer`, CLS dropped (LLaVA-1.5 ``patch`` select feature).

    MaVEn never trains the tower, so the forward runs without autograd: no activations are kept
    for it in any stage.
    """

    def __init__(self, tower: CLIPVisionModel, select_layer: int = -2):
        super().__init__()
        self.tower = tower
        self.select_layer = select_layer

    @property
    def hidden_size(self) -> int:
        return self.tower.config.hidden_size

    @property
    def num_patches(self) -> int:
        cfg = self.tower.config
        return (cfg.image_size // cfg.patch_size) ** 2

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, num_patches, hidden]."""
        dtype = next(self.tower.parameters()).dtype
        out = self.tower(pixel_values.to(dtype), output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, 1:]
