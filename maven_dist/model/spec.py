"""What MaVEn adds around the LLM and the vision tower, as saved in a model directory's config.json."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MavenSpec:
    select_layer: int = -2
    """CLIP hidden-state layer of the patch features (LLaVA-1.5: the penultimate)."""
    keep_ratio: float = 0.25
    """alpha: the fraction of continuous patches kept per image."""
    selector_hidden_size: int = 1024
    """Width of the selector's 3-layer MLP."""
    projector: str = "mlp2x_gelu"
    """Projector kind (``maven_dist.model.projector``)."""
    num_codes: int = 32
    """Discrete codes per image."""
    eos_token_id: int = 2
    """``</s>``: h_eos is the state at it."""
    bos_token_id: int | None = 1
    """``<s>``, first token of the h_eos pass (None: the tokenizer has none)."""
    label_threshold: float = 0.5
    """Selector score above which a patch counts as predicted relevant (stage-1 metrics)."""
