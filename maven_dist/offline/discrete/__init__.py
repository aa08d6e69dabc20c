"""The discrete view's tokenizer interface: images -> ``num_codes`` codes in [0, codebook_size) each.

MaVEn's discrete view is SEED (``discrete_seed.py``); the tiny recipe, and users without SEED
weights, use a k-means tokenizer over CLIP patch features (``discrete_kmeans.py``). Codes are
computed once, offline, by ``maven tokenize`` into the shards' ``image_codes`` column;
training never runs a tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import torch
from PIL import Image

if TYPE_CHECKING:
    from maven_dist.offline.discrete.seed import SeedConfig

TokenizerKind = Literal["seed", "kmeans"]


@runtime_checkable
class DiscreteTokenizer(Protocol):
    """Anything that turns images into a fixed number of discrete codes."""

    num_codes: int
    """Codes per image (SEED: 32)."""
    codebook_size: int
    """Codes are in [0, codebook_size) (SEED: 8192)."""

    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images of any size -> LongTensor [len(images), num_codes], in the tokenizer's code order."""
        ...


def load_discrete_tokenizer(
    kind: TokenizerKind,
    path: str | Path,
    *,
    eva_path: str | Path | None = None,
    tower_path: str | Path | None = None,
    seed_config: SeedConfig | None = None,
    device: str = "",
    dtype: torch.dtype = torch.float32,
) -> DiscreteTokenizer:
    """Load a tokenizer from local files only (safetensors or ``torch.load(weights_only=True)``).

    * ``seed``: `path` is ``seed_quantizer.pt`` (or a directory holding it); `eva_path` is the EVA
      ViT-g weights (``eva_vit_g.pth``) unless the quantizer file carries ``visual_encoder.*`` itself;
      `seed_config` defaults to the official shapes (EVA ViT-g, BERT-base Q-Former, 8192 x 32).
    * ``kmeans``: `path` is the directory :func:`train_kmeans_tokenizer` wrote; `tower_path`
      overrides the CLIP tower directory recorded in it.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "seed":
        from maven_dist.offline.discrete.seed import load_seed_tokenizer

        return load_seed_tokenizer(path, eva_path=eva_path, cfg=seed_config, device=device, dtype=dtype)
    if kind == "kmeans":
        from maven_dist.offline.discrete.kmeans import KMeansTokenizer

        return KMeansTokenizer.from_pretrained(path, tower_path=tower_path, device=device, dtype=dtype)
    raise ValueError(f"unknown discrete tokenizer {kind!r}; choose 'seed' or 'kmeans'")
