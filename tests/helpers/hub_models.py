"""Base-model directories laid out as the Hugging Face hub ships them, at reduced depth and width.

Every other test builds its models with ``save_pretrained``; a 7B run starts from files nobody here wrote:

* ``lmsys/vicuna-7b-v1.5``: ``config.json``, ``generation_config.json``, ``special_tokens_map.json``,
  ``tokenizer_config.json`` (the published contents; ``config.json`` with fewer layers and narrower
  widths), a SentencePiece ``tokenizer.model`` and *no* ``tokenizer.json``, fp16 weights in
  ``pytorch_model-0000N-of-0000M.bin`` shards with ``pytorch_model.bin.index.json`` (or, as newer
  uploads are, ``model-0000N-of-0000M.safetensors`` with ``model.safetensors.index.json``);
* ``openai/clip-vit-large-patch14-336``: its ``preprocessor_config.json`` as published, the vision
  tower's ``config.json`` and ``model.safetensors``;
* ``AILab-CVC/seed-tokenizer-2``: ``seed_quantizer.pt`` with the decoder-side keys the real file
  carries, next to LAVIS's ``eva_vit_g.pth``.

The SentencePiece model is trained here with LLaMA's settings (BPE, byte fallback, dummy prefix, split
digits, identity normalisation, whitespace kept) on a small fixed corpus, so it segments like LLaMA's
(``▁USER``, ``▁`` + ``<0x0A>`` for a newline after an image, bytes for what the corpus never saw).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from maven_dist.data.templates import LLAMA_2_SYSTEM, VICUNA_SYSTEM

# lmsys/vicuna-7b-v1.5 as published (transformers 4.31.0); the model tests replace the layer count and widths.
VICUNA_CONFIG = {
    "_name_or_path": "vicuna-7b-v1.5",
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0",
    "use_cache": True,
    "vocab_size": 32000,
}
# Sampling settings without do_sample: transformers >= 4.38 warns about them, and refuses to *save* them
# with strict validation (LLaVA's users hit it when saving a model built on Vicuna v1.5).
VICUNA_GENERATION_CONFIG = {
    "bos_token_id": 1,
    "eos_token_id": 2,
    "max_length": 4096,
    "pad_token_id": 0,
    "temperature": 0.9,
    "top_p": 0.6,
    "transformers_version": "4.31.0",
}


def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


VICUNA_SPECIAL_TOKENS_MAP = {
    "bos_token": _added("<s>"),
    "eos_token": _added("</s>"),
    "pad_token": "<unk>",
    "unk_token": _added("<unk>"),
}
VICUNA_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {"__type": "AddedToken", **_added("<s>")},
    "clean_up_tokenization_spaces": False,
    "eos_token": {"__type": "AddedToken", **_added("</s>")},
    "legacy": False,
    "model_max_length": 4096,
    "pad_token": None,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": {"__type": "AddedToken", **_added("<unk>")},
}
# openai/clip-vit-large-patch14-336's preprocessor_config.json as published.
CLIP_336_PREPROCESSOR_CONFIG = {
    "crop_size": 336,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 336,
}

# LLaMA's trainer and normaliser settings (read from its tokenizer.model's ModelProto), less the corpus size.
LLAMA_SPM_SETTINGS = {
    "model_type": "bpe",
    "byte_fallback": True,
    "split_digits": True,
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "normalization_rule_name": "identity",
    "allow_whitespace_only_pieces": True,
    "split_by_unicode_script": True,
    "split_by_whitespace": True,
    "split_by_number": True,
    "max_sentencepiece_length": 16,
    "character_coverage": 0.99995,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
}
# Words of the templates and of the golden cases (tests/unit/test_golden_tokenization.py), each often enough
# to become one piece. One sentence per line and no newline anywhere, as LLaMA's corpus was split: a newline
# is then no piece and falls back to its byte <0x0A>, as in LLaMA's vocabulary.
CORPUS_LINES = (
    VICUNA_SYSTEM,
    LLAMA_2_SYSTEM,
    "USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>>",
    'What is shown? What colour is the circle? "What" is in the image? (What) And the square? "And"',
    "Describe the image. Describe the first image and the second image. Compare the images.",
    "A red circle. The circle is red. It is blue. Yes. No. Two images. Which one has more circles?",
    'He said "USER: hi" and "ASSISTANT: no". Say hello. hello world. 12 circles, 3 squares, 40 images.',
    "café naïve über straße",
)


def train_llama_sentencepiece(
    path: Path, lines: tuple[str, ...] = CORPUS_LINES, vocab_size: int = 700
) -> Path:
    """Train a SentencePiece BPE model with LLaMA's settings on `lines` (each 30 times) and write it to `path`."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in lines for _ in range(30)]),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus runs out of merges before 700 pieces
        num_threads=1,
        minloglevel=2,
        **LLAMA_SPM_SETTINGS,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


@dataclass(frozen=True)
class LlamaShape:
    """The reduced widths a hub-layout Vicuna directory is written with (everything else as published)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4


def write_vicuna_tokenizer(out_dir: Path, tokenizer_model: Path, legacy: bool = False) -> Path:
    """``tokenizer.model`` + the published ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    (out_dir / "special_tokens_map.json").write_text(json.dumps(VICUNA_SPECIAL_TOKENS_MAP, indent=2))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(VICUNA_TOKENIZER_CONFIG | {"legacy": legacy}, indent=2)
    )
    return out_dir


def vicuna_state_dict(shape: LlamaShape, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp16 weights under LlamaForCausalLM's names (as the hub shards hold them), random but seeded."""
    gen = torch.Generator().manual_seed(seed)
    h, inter = shape.hidden_size, shape.intermediate_size

    def w(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * 0.05).to(torch.float16)

    state = {"model.embed_tokens.weight": w(vocab_size, h)}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": w(h, h),
            p + "self_attn.k_proj.weight": w(h, h),
            p + "self_attn.v_proj.weight": w(h, h),
            p + "self_attn.o_proj.weight": w(h, h),
            p + "mlp.gate_proj.weight": w(inter, h),
            p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
            p + "input_layernorm.weight": (1 + w(h)).to(torch.float16),
            p + "post_attention_layernorm.weight": (1 + w(h)).to(torch.float16),
        }
    state["model.norm.weight"] = (1 + w(h)).to(torch.float16)
    state["lm_head.weight"] = w(vocab_size, h)
    return state


def _shards(state: dict[str, torch.Tensor], num_shards: int) -> list[dict[str, torch.Tensor]]:
    """Split in key order into `num_shards` runs (as save_pretrained's size-based split keeps order)."""
    keys = list(state)
    per = -(-len(keys) // num_shards)
    return [{k: state[k] for k in keys[i * per : (i + 1) * per]} for i in range(num_shards)]


def build_vicuna_dir(
    out_dir: Path,
    tokenizer_model: Path,
    *,
    weights: str = "bin",
    shape: LlamaShape = LlamaShape(),
    num_shards: int = 2,
    legacy: bool = False,
    seed: int = 0,
) -> Path:
    """A ``lmsys/vicuna-7b-v1.5``-shaped directory; `weights` is ``bin`` (the upload) or ``safetensors``."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    write_vicuna_tokenizer(out_dir, tokenizer_model, legacy=legacy)
    vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer_model)).get_piece_size()
    config = VICUNA_CONFIG | {
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_heads,
        "vocab_size": vocab_size,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(VICUNA_GENERATION_CONFIG, indent=2))
    state = vicuna_state_dict(shape, vocab_size, seed)
    weight_map, total = {}, sum(t.numel() * t.element_size() for t in state.values())
    for k, shard in enumerate(_shards(state, num_shards), start=1):
        if weights == "bin":
            name = f"pytorch_model-{k:05d}-of-{num_shards:05d}.bin"
            torch.save(shard, out_dir / name)
        else:
            name = f"model-{k:05d}-of-{num_shards:05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    index = "pytorch_model.bin.index.json" if weights == "bin" else "model.safetensors.index.json"
    (out_dir / index).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return out_dir


@dataclass(frozen=True)
class ClipShape:
    """A reduced CLIP ViT-L/14-336: the real 336 px and 14 px patches (24 x 24), narrower and shallower."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    image_size: int = 336
    patch_size: int = 14


def build_clip_336_dir(out_dir: Path, shape: ClipShape = ClipShape(), seed: int = 0) -> Path:
    """An ``openai/clip-vit-large-patch14-336``-shaped directory: the whole ``CLIPModel`` (text tower, both
    projections and ``logit_scale`` included, as the hub has it) in ``model.safetensors``, its
    ``config.json`` (``CLIPConfig`` with ``text_config`` and ``vision_config``) and the published
    ``preprocessor_config.json``."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    vision = {
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "image_size": shape.image_size,
        "patch_size": shape.patch_size,
        "projection_dim": 16,
        "hidden_act": "quick_gelu",
    }
    text = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "projection_dim": 16,
        "hidden_act": "quick_gelu",
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in CLIPModel(config).state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(
        json.dumps(config.to_dict() | {"architectures": ["CLIPModel"], "torch_dtype": "float32"}, indent=2)
    )
    (out_dir / "preprocessor_config.json").write_text(json.dumps(CLIP_336_PREPROCESSOR_CONFIG, indent=2))
    return out_dir


# --------------------------------------------------------------------------- SEED-2


@dataclass(frozen=True)
class SeedShape:
    """A reduced SEED-2 with the official layout: EVA and Q-Former one head wide (88 and 64, the official
    head widths), the real 32 queries and 8192 x 32 codebook."""

    eva_width: int = 88
    eva_blocks: int = 2
    """Blocks in eva_vit_g.pth; BLIP-2 uses all but the last (the official file has 40, 39 used)."""
    image_size: int = 224
    qformer_width: int = 64
    qformer_layers: int = 2
    decode_depth: int = 1
    """SEED-2's decoder blocks (blocks.N, blocks_image.N); the official file has 4 of each."""
    num_queries: int = 32
    codebook_size: int = 8192
    codebook_dim: int = 32


def _block(prefix: str, width: int, mlp: int) -> dict[str, tuple[int, ...]]:
    """A timm-style ViT block as SEED-2's decoder builds it (qkv with bias)."""
    return {
        prefix + "norm1.weight": (width,),
        prefix + "norm1.bias": (width,),
        prefix + "attn.qkv.weight": (3 * width, width),
        prefix + "attn.qkv.bias": (3 * width,),
        prefix + "attn.proj.weight": (width, width),
        prefix + "attn.proj.bias": (width,),
        prefix + "norm2.weight": (width,),
        prefix + "norm2.bias": (width,),
        prefix + "mlp.fc1.weight": (mlp, width),
        prefix + "mlp.fc1.bias": (mlp,),
        prefix + "mlp.fc2.weight": (width, mlp),
        prefix + "mlp.fc2.bias": (width,),
    }


def seed2_quantizer_shapes(shape: SeedShape) -> dict[str, tuple[int, ...]]:
    """``seed_quantizer.pt``'s keys and shapes, written out from SEED-2's ``Blip2QformerQuantizer``
    (AILab-CVC/SEED, models/seed_qformer/qformer_quantizer.py) at `shape`: the encode path, the decoder
    side, and the BLIP-2 text branch that class deletes before loading (a file may still carry it)."""
    h, v, q, inter = shape.qformer_width, shape.eva_width, shape.num_queries, 2 * shape.qformer_width
    out: dict[str, tuple[int, ...]] = {
        "query_tokens": (1, q, h),
        "ln_vision.weight": (v,),
        "ln_vision.bias": (v,),
        "Qformer.bert.embeddings.LayerNorm.weight": (h,),
        "Qformer.bert.embeddings.LayerNorm.bias": (h,),
        "encode_task_layer.0.weight": (h, h),
        "encode_task_layer.0.bias": (h,),
        "encode_task_layer.2.weight": (shape.codebook_dim, h),
        "encode_task_layer.2.bias": (shape.codebook_dim,),
        "quantize.embedding.weight": (shape.codebook_size, shape.codebook_dim),
    }
    for i in range(shape.qformer_layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        for block in ["attention"] + (["crossattention"] if i % 2 == 0 else []):
            kv = v if block == "crossattention" else h
            for name, fan_in in (("query", h), ("key", kv), ("value", kv)):
                out[f"{p}{block}.self.{name}.weight"] = (h, fan_in)
                out[f"{p}{block}.self.{name}.bias"] = (h,)
            out |= {
                f"{p}{block}.output.dense.weight": (h, h),
                f"{p}{block}.output.dense.bias": (h,),
                f"{p}{block}.output.LayerNorm.weight": (h,),
                f"{p}{block}.output.LayerNorm.bias": (h,),
            }
        for branch in ("_query", ""):  # "" is the text branch SEED deletes
            out |= {
                f"{p}intermediate{branch}.dense.weight": (inter, h),
                f"{p}intermediate{branch}.dense.bias": (inter,),
                f"{p}output{branch}.dense.weight": (h, inter),
                f"{p}output{branch}.dense.bias": (h,),
                f"{p}output{branch}.LayerNorm.weight": (h,),
                f"{p}output{branch}.LayerNorm.bias": (h,),
            }
    out |= {  # the text branch's embeddings and MLM head
        "Qformer.bert.embeddings.word_embeddings.weight": (30523, h),
        "Qformer.bert.embeddings.position_embeddings.weight": (512, h),
        "Qformer.cls.predictions.bias": (30523,),
        "Qformer.cls.predictions.transform.dense.weight": (h, h),
        "Qformer.cls.predictions.transform.dense.bias": (h,),
        "Qformer.cls.predictions.transform.LayerNorm.weight": (h,),
        "Qformer.cls.predictions.transform.LayerNorm.bias": (h,),
        "Qformer.cls.predictions.decoder.weight": (30523, h),
        "Qformer.cls.predictions.decoder.bias": (30523,),
    }
    out |= {  # the decoder side: codes -> the image embedding of SEED's unCLIP decoder
        "decode_task_layer.0.weight": (shape.codebook_dim, shape.codebook_dim),
        "decode_task_layer.0.bias": (shape.codebook_dim,),
        "decode_task_layer.2.weight": (h, shape.codebook_dim),
        "decode_task_layer.2.bias": (h,),
        "pos_embed": (1, q, h),
        "pos_embed_image": (1, q, h),
        "image_down.0.weight": (256, h),
        "image_down.2.weight": (128, 256),
        "image_down.4.weight": (32, 128),
        "distill_image_proj.weight": (1024, q * 32),
        "distill_image_proj.bias": (1024,),
    }
    for i in range(shape.decode_depth):
        out |= _block(f"blocks.{i}.", h, 4 * h) | _block(f"blocks_image.{i}.", h, 4 * h)
    return out


def eva_vit_g_shapes(shape: SeedShape) -> dict[str, tuple[int, ...]]:
    """LAVIS's ``eva_vit_g.pth`` layout at `shape` (MLP width int(width * 4.3637), q/v biases, no k bias)."""
    w, mlp, patch = shape.eva_width, int(shape.eva_width * 4.3637), 14
    out = {
        "cls_token": (1, 1, w),
        "pos_embed": (1, (shape.image_size // patch) ** 2 + 1, w),
        "patch_embed.proj.weight": (w, 3, patch, patch),
        "patch_embed.proj.bias": (w,),
    }
    for i in range(shape.eva_blocks):
        b = f"blocks.{i}."
        out |= {k: s for k, s in _block(b, w, mlp).items() if "qkv.bias" not in k}
        out |= {b + "attn.q_bias": (w,), b + "attn.v_bias": (w,)}
    return out


def build_seed2_files(out_dir: Path, shape: SeedShape = SeedShape(), seed: int = 0) -> Path:
    """``seed_quantizer.pt`` (fp32, as the hub file) and ``eva_vit_g.pth`` side by side in `out_dir`."""
    gen = torch.Generator().manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, shapes in (
        ("seed_quantizer.pt", seed2_quantizer_shapes(shape)),
        ("eva_vit_g.pth", eva_vit_g_shapes(shape)),
    ):
        state = {k: torch.randn(s, generator=gen) * 0.1 for k, s in shapes.items()}
        if name == "seed_quantizer.pt":
            state["Qformer.bert.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
        torch.save(state, out_dir / name)
    return out_dir
