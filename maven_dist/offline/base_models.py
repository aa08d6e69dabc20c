"""Build random base models of a configured shape and save them as local HF directories.

The tiny recipe has no pretrained weights to start from, so it builds them once (seeded) and
then loads them through exactly the same local-directory path the 7B recipe uses for Vicuna and
CLIP ViT-L/14-336.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

try:  # transformers 5: the PIL-backed processor, which needs no torchvision (the default one warns without it)
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # transformers 4
    from transformers import CLIPImageProcessor

from maven_dist.config import LLMConfig, VisionConfig
from maven_dist.data.image_transform import CLIP_MEAN, CLIP_STD


def llama_config(cfg: LLMConfig, vocab_size: int) -> LlamaConfig:
    """The LLaMA config of ``model.llm`` with ``vocab_size`` text rows and an untied head, as Vicuna's."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
    )


def clip_vision_config(cfg: VisionConfig) -> CLIPVisionConfig:
    """The CLIP vision config of ``model.vision``."""
    return CLIPVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        projection_dim=cfg.hidden_size,
    )


def build_random_llm(cfg: LLMConfig, tokenizer, out_dir: Path, seed: int) -> Path:
    """A LLaMA-architecture causal LM with the tokenizer's vocabulary, saved with the tokenizer."""
    torch.manual_seed(seed)
    config = llama_config(cfg, len(tokenizer))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_random_vision_tower(cfg: VisionConfig, out_dir: Path, seed: int) -> Path:
    """A CLIP vision tower plus its image processor config, saved like openai/clip-vit-large-patch14-336."""
    torch.manual_seed(seed)
    config = clip_vision_config(cfg)
    out_dir = Path(out_dir)
    CLIPVisionModel(config).save_pretrained(out_dir)
    processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    processor.save_pretrained(out_dir)
    return out_dir
