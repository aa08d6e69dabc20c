"""SEED tokenizer: config, official key layout, strict loading, causal queries, safe loading (issue 8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from maven_dist.offline.discrete import DiscreteTokenizer, load_discrete_tokenizer
from maven_dist.offline.discrete.seed import (
    EvaVitConfig,
    SeedConfig,
    VectorQuantizer,
    build_seed_tokenizer,
    expected_shapes,
    internal_to_official,
    load_weights_file,
)

TINY = SeedConfig(
    vision=EvaVitConfig(image_size=28, patch_size=14, width=24, depth=2, num_heads=2, mlp_ratio=2.0),
    qformer_hidden_size=16,
    qformer_layers=3,
    qformer_heads=2,
    qformer_intermediate_size=32,
    num_query_tokens=6,
    codebook_size=50,
    codebook_dim=4,
)


def official_state_dict(cfg: SeedConfig, seed: int = 0, with_vit: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of AILab-CVC/SEED's seed_quantizer.pt.

    Written out by hand from SEED's ``Blip2QformerQuantizer`` (LAVIS Q-Former with the text branch
    deleted, ``encode_task_layer``, ``quantize``) plus keys of its decoder side, independently of
    the key map under test.
    """
    gen = torch.Generator().manual_seed(seed)
    h, v, q, inter = (
        cfg.qformer_hidden_size,
        cfg.vision.width,
        cfg.num_query_tokens,
        cfg.qformer_intermediate_size,
    )
    shapes: dict[str, tuple[int, ...]] = {
        "query_tokens": (1, q, h),
        "ln_vision.weight": (v,),
        "ln_vision.bias": (v,),
        "Qformer.bert.embeddings.LayerNorm.weight": (h,),
        "Qformer.bert.embeddings.LayerNorm.bias": (h,),
        "Qformer.bert.embeddings.position_ids": (1, 512),
        "encode_task_layer.0.weight": (h, h),
        "encode_task_layer.0.bias": (h,),
        "encode_task_layer.2.weight": (cfg.codebook_dim, h),
        "encode_task_layer.2.bias": (cfg.codebook_dim,),
        "quantize.embedding.weight": (cfg.codebook_size, cfg.codebook_dim),
        # decoder side: codes -> embeddings for SEED's unCLIP decoder; unused by encoding
        "decode_task_layer.0.weight": (cfg.codebook_dim, cfg.codebook_dim),
        "decode_task_layer.2.weight": (h, cfg.codebook_dim),
        "pos_embed": (1, q, h),
        "pos_embed_image": (1, q, h),
        "blocks.0.norm1.weight": (h,),
        "blocks_image.0.attn.qkv.weight": (3 * h, h),
        "image_down.0.weight": (256, h),
        "distill_image_proj.weight": (1024, q * 32),
    }
    for i in range(cfg.qformer_layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        blocks = ["attention"] + (["crossattention"] if i % cfg.cross_attention_frequency == 0 else [])
        for block in blocks:
            kv_in = v if block == "crossattention" else h
            for name, fan_in in (("query", h), ("key", kv_in), ("value", kv_in)):
                shapes[f"{p}{block}.self.{name}.weight"] = (h, fan_in)
                shapes[f"{p}{block}.self.{name}.bias"] = (h,)
            shapes[f"{p}{block}.output.dense.weight"] = (h, h)
            shapes[f"{p}{block}.output.dense.bias"] = (h,)
            shapes[f"{p}{block}.output.LayerNorm.weight"] = (h,)
            shapes[f"{p}{block}.output.LayerNorm.bias"] = (h,)
        shapes[f"{p}intermediate_query.dense.weight"] = (inter, h)
        shapes[f"{p}intermediate_query.dense.bias"] = (inter,)
        shapes[f"{p}output_query.dense.weight"] = (h, inter)
        shapes[f"{p}output_query.dense.bias"] = (h,)
        shapes[f"{p}output_query.LayerNorm.weight"] = (h,)
        shapes[f"{p}output_query.LayerNorm.bias"] = (h,)
    if with_vit:
        shapes.update({f"visual_encoder.{k}": s for k, s in eva_shapes(cfg.vision, cfg.vision.depth).items()})
    state = {k: torch.randn(s, generator=gen) * 0.2 for k, s in shapes.items()}
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    return state


def eva_shapes(cfg: EvaVitConfig, blocks: int) -> dict[str, tuple[int, ...]]:
    """LAVIS eva_vit_g.pth layout (``blocks`` blocks; the official file has one more than BLIP-2 uses)."""
    w, mlp, p = cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.patch_size
    shapes = {
        "cls_token": (1, 1, w),
        "pos_embed": (1, (cfg.image_size // p) ** 2 + 1, w),
        "patch_embed.proj.weight": (w, 3, p, p),
        "patch_embed.proj.bias": (w,),
    }
    for i in range(blocks):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (w,),
            b + "norm1.bias": (w,),
            b + "attn.q_bias": (w,),
            b + "attn.v_bias": (w,),
            b + "attn.qkv.weight": (3 * w, w),
            b + "attn.proj.weight": (w, w),
            b + "attn.proj.bias": (w,),
            b + "norm2.weight": (w,),
            b + "norm2.bias": (w,),
            b + "mlp.fc1.weight": (mlp, w),
            b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (w, mlp),
            b + "mlp.fc2.bias": (w,),
        }
    return shapes


def eva_state_dict(cfg: EvaVitConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * 0.2 for k, s in eva_shapes(cfg, cfg.depth + 1).items()}


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (28, 28), (20, 50), (64, 64)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


@pytest.fixture
def seed_dir(tmp_path):
    torch.save(official_state_dict(TINY), tmp_path / "seed_quantizer.pt")
    torch.save(eva_state_dict(TINY.vision), tmp_path / "eva_vit_g.pth")
    return tmp_path


def test_default_config_has_the_official_shapes():
    shapes = {internal_to_official(k): tuple(v) for k, v in expected_shapes(SeedConfig()).items()}
    assert shapes["query_tokens"] == (1, 32, 768)
    assert shapes["quantize.embedding.weight"] == (8192, 32)
    assert shapes["encode_task_layer.0.weight"] == (768, 768)
    assert shapes["encode_task_layer.2.weight"] == (32, 768)
    assert shapes["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"] == (768, 1408)
    assert "Qformer.bert.encoder.layer.1.crossattention.self.key.weight" not in shapes  # every 2nd layer
    assert shapes["Qformer.bert.encoder.layer.11.output_query.dense.weight"] == (768, 3072)
    assert shapes["visual_encoder.pos_embed"] == (1, 257, 1408)
    assert shapes["visual_encoder.blocks.38.mlp.fc1.weight"] == (6144, 1408)
    assert "visual_encoder.blocks.39.norm1.weight" not in shapes
    assert shapes["ln_vision.weight"] == (1408,)


def test_build_from_config_and_encode_gives_codes_in_range():
    torch.manual_seed(0)
    model = build_seed_tokenizer(TINY)
    assert isinstance(model, DiscreteTokenizer)
    codes = model.encode(_images(4))
    assert codes.shape == (4, 6) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 50
    assert model.preprocess(_images(1)).shape == (1, 3, 28, 28)  # squashed to the square, as SEED does


def test_official_checkpoint_loads_strictly_and_lands_in_the_right_places(seed_dir):
    model = load_discrete_tokenizer("seed", seed_dir, seed_config=TINY, device="cpu")
    official = official_state_dict(TINY)
    eva = eva_state_dict(TINY.vision)
    torch.testing.assert_close(model.quantize.embedding.weight, official["quantize.embedding.weight"])
    torch.testing.assert_close(
        model.qformer.layernorm.weight, official["Qformer.bert.embeddings.LayerNorm.weight"]
    )
    cross = model.qformer.encoder.layer[2].crossattention.attention.key.weight
    torch.testing.assert_close(cross, official["Qformer.bert.encoder.layer.2.crossattention.self.key.weight"])
    torch.testing.assert_close(model.visual_encoder.blocks[1].attn.q_bias, eva["blocks.1.attn.q_bias"])
    codes = model.encode(_images(3))
    assert codes.shape == (3, 6) and codes.min() >= 0 and codes.max() < 50
    # The same weights inside the quantizer file (visual_encoder.*) need no EVA file.
    both = official_state_dict(TINY, with_vit=True)
    torch.save(both, seed_dir / "with_vit.pt")
    alone = load_discrete_tokenizer("seed", seed_dir / "with_vit.pt", seed_config=TINY, device="cpu")
    torch.testing.assert_close(alone.visual_encoder.cls_token, both["visual_encoder.cls_token"])


def test_strict_loading_names_the_offending_key(seed_dir, tmp_path):
    from maven_dist.offline.discrete.seed import load_seed_tokenizer

    eva = seed_dir / "eva_vit_g.pth"
    broken = official_state_dict(TINY)
    del broken["Qformer.bert.encoder.layer.1.output_query.dense.bias"]
    torch.save(broken, tmp_path / "missing.pt")
    with pytest.raises(KeyError, match="layer.1.output_query.dense.bias"):
        load_seed_tokenizer(tmp_path / "missing.pt", eva_path=eva, cfg=TINY)
    # cross-attention in layer 1: another architecture than the config's (every 2nd layer)
    extra = official_state_dict(TINY) | {
        "Qformer.bert.encoder.layer.1.crossattention.self.query.weight": torch.zeros(16, 16)
    }
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(KeyError, match="unexpected key.*layer.1.crossattention.*encode-path module"):
        load_seed_tokenizer(tmp_path / "extra.pt", eva_path=eva, cfg=TINY)
    wrong = official_state_dict(TINY) | {"quantize.embedding.weight": torch.zeros(50, 5)}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="quantize.embedding.weight.*shape"):
        load_seed_tokenizer(tmp_path / "wrong.pt", eva_path=eva, cfg=TINY)
    with pytest.raises(FileNotFoundError, match="eva_vit_g.pth"):
        load_seed_tokenizer(seed_dir / "seed_quantizer.pt", cfg=TINY)


class NotATensor:
    """A pickled object that is not a tensor: loading must refuse it instead of unpickling it."""

    def __init__(self):
        self.payload = "would run arbitrary __reduce__ code in a hostile file"


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    torch.save({"quantize.embedding.weight": torch.zeros(2, 2), "extra": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing"):
        load_weights_file(tmp_path / "evil.pt")
    torch.save({"model": {"a": torch.ones(1)}}, tmp_path / "wrapped.pt")
    assert list(load_weights_file(tmp_path / "wrapped.pt")) == ["a"]


def test_queries_are_causal():
    """Query i sees queries <= i only: changing the last query token leaves earlier codes' inputs alone."""
    torch.manual_seed(0)
    model = build_seed_tokenizer(TINY)
    pixels = model.preprocess(_images(2))

    def task_outputs() -> torch.Tensor:
        embeds = model.ln_vision(model.visual_encoder(pixels))
        from maven_dist.offline.discrete.seed import causal_query_mask

        hidden = model.qformer(
            query_embeds=model.query_tokens.expand(2, -1, -1),
            attention_mask=causal_query_mask(6, torch.float32, model.device),
            encoder_hidden_states=embeds,
        ).last_hidden_state
        return model.encode_task_layer(hidden)

    with torch.no_grad():
        before = task_outputs()
        model.query_tokens[:, -1] += torch.randn(16)  # not a constant: the first LayerNorm would remove it
        after_last = task_outputs()
        model.query_tokens[:, 0] += torch.randn(16)
        after_first = task_outputs()
    torch.testing.assert_close(after_last[:, :-1], before[:, :-1])
    assert not torch.allclose(after_last[:, -1], before[:, -1])
    assert not torch.allclose(after_first[:, 1:], after_last[:, 1:])


def test_vector_quantizer_picks_the_l2_nearest_code():
    vq = VectorQuantizer(3, 2)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0]]))
    z = torch.tensor([[[0.4, 0.0], [0.6, 0.1], [6.0, 6.0], [-5.0, 1.0]]])
    assert vq(z).tolist() == [[0, 1, 2, 0]]


def _reference_qformer(
    sd: dict[str, torch.Tensor], cfg: SeedConfig, image_embeds: torch.Tensor
) -> torch.Tensor:
    """LAVIS/SEED's causal Q-Former query branch written out from its source, on official key names."""
    import torch.nn.functional as F

    heads, h = cfg.qformer_heads, cfg.qformer_hidden_size

    def ln(x, prefix, eps=1e-12):
        return F.layer_norm(x, (h,), sd[prefix + ".weight"], sd[prefix + ".bias"], eps)

    def lin(x, prefix):
        return x @ sd[prefix + ".weight"].t() + sd[prefix + ".bias"]

    def attention(prefix, x, kv, mask):
        def split(t):
            return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        q, k, v = (
            split(lin(x, prefix + ".self.query")),
            split(lin(kv, prefix + ".self.key")),
            split(lin(kv, prefix + ".self.value")),
        )
        scores = q @ k.transpose(-1, -2) / (h // heads) ** 0.5
        if mask is not None:
            scores = scores + mask
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        return ln(lin(ctx, prefix + ".output.dense") + x, prefix + ".output.LayerNorm")

    n, q = image_embeds.shape[0], cfg.num_query_tokens
    x = ln(sd["query_tokens"].expand(n, -1, -1), "Qformer.bert.embeddings.LayerNorm")
    causal = (1.0 - torch.ones(q, q).tril()) * -10000.0  # SEED's get_extended_attention_mask
    for i in range(cfg.qformer_layers):
        p = f"Qformer.bert.encoder.layer.{i}"
        x = attention(p + ".attention", x, x, causal)
        if i % cfg.cross_attention_frequency == 0:
            x = attention(p + ".crossattention", x, image_embeds, None)
        inner = F.gelu(lin(x, p + ".intermediate_query.dense"))
        x = ln(lin(inner, p + ".output_query.dense") + x, p + ".output_query.LayerNorm")
    return x


def test_qformer_matches_the_official_causal_qformer_computation(seed_dir):
    """transformers' Blip2QFormerModel + key map + causal mask == SEED's Q-Former on the same weights."""
    from maven_dist.offline.discrete.seed import causal_query_mask

    model = load_discrete_tokenizer("seed", seed_dir, seed_config=TINY, device="cpu")
    official = official_state_dict(TINY)
    embeds = torch.randn(3, 5, TINY.vision.width, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model.qformer(
            query_embeds=model.query_tokens.expand(3, -1, -1),
            attention_mask=causal_query_mask(TINY.num_query_tokens, torch.float32, model.device),
            encoder_hidden_states=embeds,
        ).last_hidden_state
    torch.testing.assert_close(ours, _reference_qformer(official, TINY, embeds), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- SEED-2's real file (issue 24, item 8)


def test_the_module_is_about_seed_2():
    import maven_dist.offline.discrete.seed as seed

    assert "AILab-CVC/seed-tokenizer-2" in seed.__doc__ and "tokenizer v1" not in seed.__doc__


def test_seed2_files_with_the_decoder_side_load_and_land_exactly(tmp_path):
    """seed_quantizer.pt as SEED-2's Blip2QformerQuantizer holds it (decoder side: decode_task_layer, blocks,
    blocks_image, pos_embed(_image), image_down, distill_image_proj; plus the BLIP-2 text branch it deletes
    before loading) next to a 2-block eva_vit_g.pth: the shapes are read from the files, nothing is refused."""
    from maven_dist.offline.discrete.seed import DECODER_SIDE_KEYS, load_seed_tokenizer
    from tests.helpers.hub_models import SeedShape, build_seed2_files

    shape = SeedShape()
    directory = build_seed2_files(tmp_path, shape)
    official = torch.load(directory / "seed_quantizer.pt", weights_only=True)
    eva = torch.load(directory / "eva_vit_g.pth", weights_only=True)
    decoder_side = [k for k in official if DECODER_SIDE_KEYS.fullmatch(k)]
    # 35 decoder-side + 22 text-branch keys at this depth (at the official one, 4 decoder blocks and 12
    # Q-Former layers: 107 + 82)
    assert len(decoder_side) == 57
    model = load_seed_tokenizer(directory)  # finds eva_vit_g.pth next to it
    cfg = model.cfg
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.num_heads, cfg.vision.mlp_width) == (88, 1, 1, 384)
    assert (
        cfg.qformer_hidden_size,
        cfg.qformer_layers,
        cfg.qformer_heads,
        cfg.cross_attention_frequency,
    ) == (
        64,
        2,
        1,
        2,
    )
    assert (cfg.num_query_tokens, cfg.codebook_size, cfg.codebook_dim, cfg.vision.image_size) == (
        32,
        8192,
        32,
        224,
    )
    assert torch.equal(model.quantize.embedding.weight, official["quantize.embedding.weight"])
    assert torch.equal(model.query_tokens, official["query_tokens"])
    assert torch.equal(
        model.qformer.encoder.layer[0].crossattention.attention.key.weight,
        official["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"],
    )
    assert torch.equal(model.visual_encoder.blocks[0].attn.q_bias, eva["blocks.0.attn.q_bias"])
    codes = model.encode(_images(2))
    assert codes.shape == (2, 32) and codes.min() >= 0 and codes.max() < 8192


def test_the_official_shapes_are_read_back_from_the_files():
    """SeedConfig.from_checkpoints on tensors of the official shapes (40-block EVA file) is SeedConfig()."""
    from maven_dist.offline.discrete.seed import SeedConfig

    default = SeedConfig()
    quantizer = {
        internal_to_official(k): torch.empty(s, device="meta")
        for k, s in expected_shapes(default).items()
        if not k.startswith("visual_encoder.")
    }
    eva = {k: torch.empty(s, device="meta") for k, s in eva_shapes(default.vision, 40).items()}
    got = SeedConfig.from_checkpoints(quantizer, eva)
    assert got.vision.mlp_width == default.vision.mlp_width == 6144
    assert (got.vision.depth, got.vision.num_heads, got.vision.width, got.vision.image_size) == (
        39,
        16,
        1408,
        224,
    )
    assert {k: v for k, v in vars(got).items() if k != "vision"} == {
        k: v for k, v in vars(default).items() if k != "vision"
    }


def test_keys_nobody_names_are_ignored_with_a_warning(seed_dir, tmp_path, capsys):
    from maven_dist.offline.discrete.seed import load_seed_tokenizer

    odd = official_state_dict(TINY) | {"distill_text_proj.weight": torch.zeros(3, 3)}
    torch.save(odd, tmp_path / "odd.pt")
    load_seed_tokenizer(tmp_path / "odd.pt", eva_path=seed_dir / "eva_vit_g.pth", cfg=TINY)
    assert "ignoring 1 keys outside the encode path" in capsys.readouterr().err
