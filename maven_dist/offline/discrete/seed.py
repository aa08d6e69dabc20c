"""The SEED-2 tokenizer (AILab-CVC/seed-tokenizer-2, the one SEED-LLaMA uses), encode path only.

image (224 x 224, squashed, CLIP mean/std)
  -> EVA ViT-g/14 (1408 wide, 39 blocks, no final norm; all 257 tokens) -> ``ln_vision``
  -> BLIP-2 Q-Former (BERT-base, cross-attention every 2nd layer) with 32 learned queries that
     attend to each other *causally* (query i sees queries <= i: SEED's left-to-right codes)
  -> ``encode_task_layer``: Linear(768, 768) -> tanh -> Linear(768, 32)
  -> VQ: index of the L2-nearest row of the 8192 x 32 codebook ``quantize.embedding.weight``.

Weights come from the official files, read without unpickling code: ``seed_quantizer.pt`` of
``AILab-CVC/seed-tokenizer-2`` (keys ``query_tokens``, ``Qformer.bert.*``, ``ln_vision.*``,
``encode_task_layer.*``, ``quantize.embedding.weight``, plus the decoder side below) and ``eva_vit_g.pth``
(LAVIS's EVA ViT-g: ``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``; 40 blocks of
which BLIP-2 uses the first 39) unless the quantizer file carries ``visual_encoder.*`` itself. The
shapes are read from the files (:meth:`SeedConfig.from_checkpoints`), so a reduced copy with the same
layout loads too; the head counts follow EVA ViT-g's and BERT's head widths (88 and 64).

The Q-Former is transformers' :class:`Blip2QFormerModel` (same layers as LAVIS's, query branch
only, as in SEED, which deletes the text branch) given a causal 4-D mask; LAVIS and HF name two
things differently, which :func:`official_to_internal` maps. Loading is strict where it matters: every
encode-path key must be present with its official shape, and a key in an encode-path module that the
config does not have (e.g. cross-attention in an odd layer) stops the load. The keys SEED-2's own class
(``Blip2QformerQuantizer`` in AILab-CVC/SEED ``models/seed_qformer/qformer_quantizer.py``) holds beyond
the encode path are accepted by name (:data:`DECODER_SIDE_KEYS`), and so is the BLIP-2 text branch that
class deletes before it loads the file with ``strict=False``. SEED's real file is known to carry 146 keys
that class does not have (the unexpected-key count its loader prints, OpenMOSS/AnyGPT issue 14) and the
list is not published: any other key outside the encode path is accepted with a warning that names it.
"""

from __future__ import annotations

import math
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from maven_dist.data.image_transform import CLIP_MEAN, CLIP_STD

WEIGHTS_NAME = "seed_quantizer.pt"
EVA_WEIGHTS_NAME = "eva_vit_g.pth"

_WB = r"\.(weight|bias)"
DECODER_SIDE_KEYS = re.compile(
    "|".join(
        [
            # SEED-2's decoder side, codes -> the unCLIP image embedding (Blip2QformerQuantizer.__init__)
            rf"decode_task_layer\.[02]{_WB}",
            r"pos_embed(_image)?",
            rf"blocks(_image)?\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2){_WB}",
            r"image_down\.[024]\.weight",
            rf"distill_image_proj{_WB}",
            # its use_qformer_image=True variant: a one-query reverse Q-Former
            r"Reverse_Qformer\..+",
            r"reverse_tokens",
            # BLIP-2's Q-Former text branch, which SEED deletes before loading (word and position
            # embeddings, each layer's text feed-forward, the MLM head)
            r"Qformer\.bert\.embeddings\.(word_embeddings\.weight|position_embeddings\.weight|position_ids)",
            rf"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate\.dense|output\.dense|output\.LayerNorm){_WB}",
            r"Qformer\.cls\.predictions\..+",
        ]
    )
)
"""Keys of SEED-2's ``seed_quantizer.pt`` that encoding never reads, by name (see the module docstring)."""
_ENCODE_MODULES = (
    "query_tokens",
    "ln_vision.",
    "Qformer.",
    "encode_task_layer.",
    "quantize.",
    "visual_encoder.",
)
"""Where the encode path's weights live: an unknown key here means another architecture, not a spare part."""
# EVA ViT-g checkpoint keys the 39-block encoder does not use (BLIP-2 drops the last block).
_EVA_UNUSED = ("norm.", "fc_norm.", "head.", "lm_head.", "rel_pos_bias.")


@dataclass
class EvaVitConfig:
    image_size: int = 224
    """Input side (SEED: 224)."""
    patch_size: int = 14
    """Patch side."""
    width: int = 1408
    """Token width (EVA ViT-g: 1408)."""
    depth: int = 39
    """Blocks used (EVA ViT-g has 40; BLIP-2 drops the last)."""
    num_heads: int = 16
    """Attention heads (1408 / 88)."""
    mlp_ratio: float = 4.3637
    """MLP width / token width (int(1408 * 4.3637) = 6144)."""
    layer_norm_eps: float = 1e-6
    """Block LayerNorm epsilon."""

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class SeedConfig:
    vision: EvaVitConfig = field(default_factory=EvaVitConfig)
    """The EVA ViT-g image encoder."""
    qformer_hidden_size: int = 768
    """Q-Former width (BERT-base)."""
    qformer_layers: int = 12
    """Q-Former layers."""
    qformer_heads: int = 12
    """Q-Former attention heads."""
    qformer_intermediate_size: int = 3072
    """Q-Former MLP width."""
    cross_attention_frequency: int = 2
    """A cross-attention to the image in every this-many layers (layers 0, 2, 4, ...)."""
    num_query_tokens: int = 32
    """Causal queries = codes per image."""
    codebook_size: int = 8192
    """VQ codebook entries."""
    codebook_dim: int = 32
    """VQ code width."""

    @classmethod
    def from_checkpoints(
        cls,
        quantizer: dict[str, torch.Tensor],
        eva: dict[str, torch.Tensor] | None,
        source: str = "seed_quantizer.pt",
    ) -> SeedConfig:
        """The shapes of SEED's files: widths, depths, queries and codebook read from the tensors; heads from
        EVA ViT-g's and BERT's head widths; an EVA file's last block left out as BLIP-2 leaves it out."""
        vit = {
            k.removeprefix("visual_encoder."): v
            for k, v in quantizer.items()
            if k.startswith("visual_encoder.")
        }
        in_quantizer = bool(vit)
        if not vit:
            if eva is None:
                raise FileNotFoundError(
                    f"{source} has no visual_encoder.* weights: pass the EVA ViT-g file (eva_vit_g.pth) as eva_path"
                )
            vit = eva
        first_ffn = "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"
        for where, keys, name in (
            (quantizer, ("query_tokens", "ln_vision.weight", "quantize.embedding.weight", first_ffn), source),
            (
                vit,
                ("pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"),
                "the EVA ViT-g weights",
            ),
        ):
            missing = [k for k in keys if k not in where]
            if missing:
                raise KeyError(f"cannot read SEED's shapes: {name} lacks {missing[0]!r}")
        width = quantizer["ln_vision.weight"].shape[0]
        patch = vit["patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(vit["pos_embed"].shape[1] - 1)
        blocks = 1 + max(int(k.split(".")[1]) for k in vit if k.startswith("blocks."))
        mlp = vit["blocks.0.mlp.fc1.weight"].shape[0]
        hidden = quantizer["query_tokens"].shape[-1]
        layers = [
            int(k.split(".")[4])
            for k in quantizer
            if re.fullmatch(r"Qformer\.bert\.encoder\.layer\.\d+\.attention\..+", k)
        ]
        cross = sorted(
            {
                int(k.split(".")[4])
                for k in quantizer
                if ".crossattention." in k and k.startswith("Qformer.bert.")
            }
        )
        num_layers = 1 + max(layers, default=-1)
        for name, w, head in (("EVA ViT-g", width, 88), ("Q-Former", hidden, 64)):
            if w % head:
                raise ValueError(
                    f"{source}: the {name} is {w} wide, not a multiple of its head width {head}; pass a SeedConfig"
                )
        vision = EvaVitConfig(
            image_size=grid * patch,
            patch_size=patch,
            width=width,
            # LAVIS builds 39 blocks and loads the 40 of eva_vit_g.pth with strict=False
            depth=blocks if in_quantizer else blocks - 1,
            num_heads=width // 88,
            # int(width * mlp_ratio) must give the file's MLP width (1408 * 4.3637 -> 6144)
            mlp_ratio=(mlp + 0.5) / width,
        )
        codebook = quantizer["quantize.embedding.weight"]
        return cls(
            vision=vision,
            qformer_hidden_size=hidden,
            qformer_layers=num_layers,
            qformer_heads=hidden // 64,
            qformer_intermediate_size=quantizer[first_ffn].shape[0],
            cross_attention_frequency=cross[1] - cross[0] if len(cross) > 1 else max(num_layers, 2),
            num_query_tokens=quantizer["query_tokens"].shape[1],
            codebook_size=codebook.shape[0],
            codebook_dim=codebook.shape[1],
        )

    def qformer_config(self) -> Blip2QFormerConfig:
        return Blip2QFormerConfig(
            hidden_size=self.qformer_hidden_size,
            num_hidden_layers=self.qformer_layers,
            num_attention_heads=self.qformer_heads,
            intermediate_size=self.qformer_intermediate_size,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
            cross_attention_frequency=self.cross_attention_frequency,
            encoder_hidden_size=self.vision.width,
            use_qformer_text_input=False,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )


# --------------------------------------------------------------------------- EVA ViT-g


class EvaAttention(nn.Module):
    """EVA attention: one qkv matrix without bias, separate q and v biases (k has none)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class EvaMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EvaBlock(nn.Module):
    def __init__(self, cfg: EvaVitConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = EvaAttention(cfg.width, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = EvaMlp(cfg.width, cfg.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: EvaVitConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class EvaVisionTransformer(nn.Module):
    """EVA ViT-g as LAVIS builds it for BLIP-2 (parameter names as in ``eva_vit_g.pth``)."""

    def __init__(self, cfg: EvaVitConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width))
        self.blocks = nn.ModuleList(EvaBlock(cfg) for _ in range(cfg.depth))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, 1 + patches, width] (every token of the last used block, no final norm)."""
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


# --------------------------------------------------------------------------- SEED


class VectorQuantizer(nn.Module):
    """The codebook (``quantize.embedding.weight``); encode = L2-nearest row."""

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[..., dim] -> LongTensor [...]: argmin_j ||z - e_j||^2 (computed in fp32, as ties matter)."""
        flat = z.reshape(-1, z.shape[-1]).float()
        codebook = self.embedding.weight.float()
        dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        return dist.argmin(dim=1).view(z.shape[:-1])


def causal_query_mask(num_queries: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive [1, 1, q, q] mask: query i attends to queries j <= i (SEED's causal Q-Former)."""
    allowed = torch.ones(num_queries, num_queries, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(num_queries, num_queries, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


class SeedTokenizer(nn.Module):
    """SEED's encoder: image -> ``num_query_tokens`` codes in [0, codebook_size)."""

    def __init__(self, cfg: SeedConfig):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = EvaVisionTransformer(cfg.vision)
        self.ln_vision = nn.LayerNorm(cfg.vision.width)  # LAVIS's LayerNorm: default eps 1e-5
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.qformer_hidden_size))
        self.qformer = Blip2QFormerModel(cfg.qformer_config())
        self.encode_task_layer = nn.Sequential(
            nn.Linear(cfg.qformer_hidden_size, cfg.qformer_hidden_size),
            nn.Tanh(),
            nn.Linear(cfg.qformer_hidden_size, cfg.codebook_dim),
        )
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.codebook_dim)
        self.num_codes = cfg.num_query_tokens
        self.codebook_size = cfg.codebook_size

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """SEED's processor: bicubic resize to a square (aspect not kept), CLIP mean/std."""
        side = self.cfg.vision.image_size
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        out = []
        for image in images:
            resized = image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
            pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(side, side, 3)
            out.append((pixels.permute(2, 0, 1).float() / 255.0 - mean) / std)
        return torch.stack(out)

    @torch.no_grad()
    def codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed [n, 3, S, S] -> LongTensor [n, num_query_tokens]."""
        dtype = self.query_tokens.dtype
        image_embeds = self.ln_vision(self.visual_encoder(pixels.to(self.device, dtype)))
        queries = self.query_tokens.expand(len(pixels), -1, -1)
        hidden = self.qformer(
            query_embeds=queries,
            attention_mask=causal_query_mask(self.num_codes, queries.dtype, self.device),
            encoder_hidden_states=image_embeds,
        ).last_hidden_state
        return self.quantize(self.encode_task_layer(hidden))

    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images -> LongTensor [n, num_query_tokens] on the CPU (a :class:`DiscreteTokenizer`)."""
        if not images:
            return torch.zeros(0, self.num_codes, dtype=torch.long)
        return self.codes(self.preprocess(images)).cpu()


# --------------------------------------------------------------------------- official weights


def official_to_internal(key: str) -> str | None:
    """Official (LAVIS/SEED) key -> this module's key; None for the known keys encoding does not use."""
    if DECODER_SIDE_KEYS.fullmatch(key):
        return None
    if key.startswith("Qformer.bert."):
        rest = key[len("Qformer.bert.") :]
        if rest.startswith("embeddings.LayerNorm."):
            return "qformer.layernorm." + rest[len("embeddings.LayerNorm.") :]
        rest = rest.replace(".attention.self.", ".attention.attention.").replace(
            ".crossattention.self.", ".crossattention.attention."
        )
        return "qformer." + rest
    return key


def internal_to_official(key: str) -> str:
    """Inverse of :func:`official_to_internal` for the encode-path keys."""
    if key.startswith("qformer.layernorm."):
        return "Qformer.bert.embeddings.LayerNorm." + key[len("qformer.layernorm.") :]
    if key.startswith("qformer."):
        rest = key[len("qformer.") :].replace(".attention.attention.", ".attention.self.")
        return "Qformer.bert." + rest.replace(".crossattention.attention.", ".crossattention.self.")
    return key


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat tensor dict from safetensors or a torch pickle read with ``weights_only=True``.

    ``weights_only`` refuses any pickled object that is not a tensor or plain container, so a
    tampered checkpoint cannot run code at load. Accepts the ``{"model": ...}`` /
    ``{"state_dict": ...}`` wrappers training scripts often add.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} contains pickled objects that are not tensors; refusing to load it "
            f"(weights_only=True). Re-save it as a plain state dict or safetensors. Details: {exc}"
        ) from exc
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a state dict of tensors (got {type(obj).__name__})")
    return obj


def expected_shapes(cfg: SeedConfig) -> dict[str, torch.Size]:
    """Every weight of :class:`SeedTokenizer` for `cfg` (internal names), built on the meta device."""
    with torch.device("meta"):
        return {k: v.shape for k, v in SeedTokenizer(cfg).state_dict().items()}


def seed_state_dict_from_official(
    quantizer: dict[str, torch.Tensor],
    eva: dict[str, torch.Tensor] | None,
    cfg: SeedConfig,
    source: str = "seed_quantizer.pt",
) -> dict[str, torch.Tensor]:
    """Map official key names to this module's; check every key and shape (strict)."""
    expected = expected_shapes(cfg)
    state: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in quantizer.items():
        internal = official_to_internal(key)
        if internal is None:
            continue
        if internal not in expected:
            if key.startswith(_ENCODE_MODULES):
                raise KeyError(
                    f"{source}: unexpected key {key!r} in an encode-path module; the file's architecture "
                    "differs from the config (EVA depth, Q-Former layers or cross-attention frequency)"
                )
            ignored.append(key)
            continue
        state[internal] = value
    if ignored:
        print(
            f"[seed] {source}: ignoring {len(ignored)} keys outside the encode path that SEED-2's decoder side "
            f"does not name either, e.g. {ignored[:3]}",
            file=sys.stderr,
        )
    if not any(k.startswith("visual_encoder.") for k in state):
        if eva is None:
            raise FileNotFoundError(
                f"{source} has no visual_encoder.* weights: pass the EVA ViT-g file (eva_vit_g.pth) as eva_path"
            )
        for key, value in eva.items():
            if key.startswith(_EVA_UNUSED):
                continue
            if key.startswith("blocks.") and int(key.split(".")[1]) >= cfg.vision.depth:
                continue  # BLIP-2 uses the first `depth` blocks of EVA ViT-g
            internal = "visual_encoder." + key
            if internal not in expected:
                raise KeyError(f"EVA ViT-g weights: unexpected key {key!r}")
            state[internal] = value
    missing = sorted(set(expected) - set(state))
    if missing:
        raise KeyError(
            f"{source}: missing {len(missing)} weights, first {internal_to_official(missing[0])!r}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key]):
            raise ValueError(
                f"{source}: {internal_to_official(key)!r} has shape {list(value.shape)}, the config expects "
                f"{list(expected[key])}; is the config (EVA width/depth, Q-Former size, codebook) right?"
            )
    return state


def build_seed_tokenizer(
    cfg: SeedConfig,
    state: dict[str, torch.Tensor] | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SeedTokenizer:
    """Build from `cfg`; with `state` (internal key names) the weights load strictly."""
    model = SeedTokenizer(cfg)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def load_seed_tokenizer(
    path: str | Path,
    *,
    eva_path: str | Path | None = None,
    cfg: SeedConfig | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SeedTokenizer:
    """The official SEED tokenizer from local files: ``seed_quantizer.pt`` (+ ``eva_vit_g.pth``)."""
    path = Path(path)
    if path.is_dir():
        eva_path = eva_path or (path / EVA_WEIGHTS_NAME if (path / EVA_WEIGHTS_NAME).is_file() else None)
        path = path / WEIGHTS_NAME
    quantizer = load_weights_file(path)
    eva = load_weights_file(eva_path) if eva_path is not None else None
    cfg = cfg or SeedConfig.from_checkpoints(quantizer, eva, source=str(path))
    state = seed_state_dict_from_official(quantizer, eva, cfg, source=str(path))
    return build_seed_tokenizer(cfg, state, device=device, dtype=dtype)
