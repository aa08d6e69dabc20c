"""MavenModel: visual token counts, selection, trainable sets per stage, vocabulary, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig

from maven_dist.config import load_config
from maven_dist.contract.batch import Batch
from maven_dist.contract.vocab import code_token, extend_tokenizer
from maven_dist.model.maven import MavenModel
from maven_dist.model.parts import apply_trainable, part_of
from maven_dist.model.selector import select_top_patches
from maven_dist.model.spec import MavenSpec
from tests.helpers.batches import make_batch as helper_batch

NUM_CODES = 8
CODEBOOK = 64


def make_model(tiny_base, keep_ratio=0.25):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.llm_dir)
    layout = extend_tokenizer(tokenizer, CODEBOOK, 128)
    spec = MavenSpec(
        keep_ratio=keep_ratio,
        selector_hidden_size=16,
        num_codes=NUM_CODES,
        eos_token_id=tokenizer.eos_token_id,
    )
    return MavenModel.from_base(tiny_base.llm_dir, tiny_base.tower_dir, layout, spec, seed=0), tokenizer


def make_batch(model, seed=0) -> Batch:
    tower = model.vision_tower
    return helper_batch(model, NUM_CODES, tower.tower.config.image_size, tower.num_patches, seed)


@pytest.mark.parametrize("alpha, expected", [(0.1, 32 + 57), (0.25, 32 + 144), (1.0, 32 + 576)])
def test_visual_positions_per_image_at_336px(tiny_base, alpha, expected):
    """32 codes + floor(alpha * 576) kept patches; <img>/</img> not counted (paper: 89 at alpha=0.1)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.llm_dir)
    layout = extend_tokenizer(tokenizer, 8192, 1024)
    llm_config = AutoModelForCausalLM.from_pretrained(tiny_base.llm_dir).config
    tower_config = CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    spec = MavenSpec(keep_ratio=alpha, selector_hidden_size=8, num_codes=32, eos_token_id=2)
    model = MavenModel.from_configs(llm_config, tower_config, layout, spec)
    views = ["discrete", "continuous"]
    codes = torch.randint(0, 8192, (2, 32))
    h_eos = model.eos_states(codes) if model.selects_patches(views) else None
    visual = model.visual_embeds(torch.randn(2, 3, 336, 336), codes, h_eos, views)
    assert visual.shape[1] - 2 == expected == 32 + math.floor(alpha * 576)
    assert model.visual_tokens_per_image(views) == expected


def test_select_top_patches_keeps_top_in_raster_order():
    scores = torch.randn(4, 576)
    for keep in (57, 144, 576):
        idx = select_top_patches(scores, keep)
        assert idx.shape == (4, keep)
        assert torch.all(idx[:, 1:] > idx[:, :-1]), "raster order"
        for row in range(4):
            threshold = scores[row].topk(keep).values.min()
            assert torch.all(scores[row, idx[row]] >= threshold)
            assert set(idx[row].tolist()) == set(scores[row].topk(keep).indices.tolist())


def test_continuous_tokens_are_the_projected_top_scoring_patches(tiny_base):
    model, _ = make_model(tiny_base, keep_ratio=0.25)
    batch = make_batch(model)
    features = model.vision_tower(batch.pixel_values)
    h_eos = model.eos_states(batch.image_codes)
    scores = model.selector(features, h_eos)
    keep = math.floor(0.25 * features.shape[1])
    top = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
    expected = model.projector(features.gather(1, top.unsqueeze(-1).expand(-1, -1, features.shape[-1])))
    got = model.visual_embeds(batch.pixel_values, batch.image_codes, h_eos, ["continuous"])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3", "stage4"])
def test_exactly_the_stage_trainable_parameters_get_gradients(tiny_base, stage):
    cfg = load_config(f"tests/recipes/tiny/{stage}.yaml")
    model, _ = make_model(tiny_base)
    apply_trainable(model, cfg.stage.trainable)
    out = model(make_batch(model), views=cfg.stage.views, loss=cfg.stage.loss)
    out.loss.backward()
    for name, param in model.named_parameters():
        trains = part_of(name) in cfg.stage.trainable
        assert param.requires_grad == trains, name
        if trains:
            assert param.grad is not None, f"{stage}: {name} should have a gradient"
        else:
            assert param.grad is None, f"{stage}: frozen {name} got a gradient"
    trained_with_signal = [
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    ]
    assert {part_of(n) for n in trained_with_signal} == set(cfg.stage.trainable)


def test_vocabulary_extension(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.llm_dir)
    texts = ["a red circle and a blue square", "which image has more green triangles ?", "zebra ünïcode 123"]
    before = [tokenizer(t).input_ids for t in texts]
    text_size = len(tokenizer)
    layout = extend_tokenizer(tokenizer, CODEBOOK, 128)
    assert [tokenizer(t).input_ids for t in texts] == before
    assert layout.text_size == text_size and layout.padded_size % 128 == 0
    assert layout.padded_size >= text_size + 2 + CODEBOOK
    codes = torch.arange(CODEBOOK)
    ids = layout.code_to_token_id(codes)
    assert torch.equal(layout.token_id_to_code(ids), codes)
    assert tokenizer.convert_ids_to_tokens(ids[:3].tolist()) == [code_token(0), code_token(1), code_token(2)]
    assert tokenizer.convert_tokens_to_ids(["<img>", "</img>"]) == [layout.img_start_id, layout.img_end_id]
    with pytest.raises(ValueError):
        layout.code_to_token_id(torch.tensor([CODEBOOK]))
    again = extend_tokenizer(tokenizer, CODEBOOK, 128)
    assert again == layout and len(tokenizer) == text_size + 2 + CODEBOOK

    model, _ = make_model(tiny_base)
    assert model.llm.get_input_embeddings().weight.shape[0] == layout.text_size
    assert model.vocab_new_rows.embed.weight.shape[0] == layout.padded_size - layout.text_size
    every_id = torch.arange(layout.padded_size)[None]
    assert model.embed_tokens(every_id).shape == (1, layout.padded_size, model.llm.config.hidden_size)
    assert model.logits(torch.zeros(1, model.llm.config.hidden_size)).shape[-1] == layout.padded_size


def test_new_input_rows_follow_the_text_rows_and_head_rows_sit_at_their_mean(tiny_base):
    """Input rows of the new tokens are drawn at the text rows' own scale, so distinct codes embed
    distinctly (h_eos can carry the image); head rows sit at the text rows' mean, so the base LLM's
    text predictions do not move (model/vocab_init.py)."""
    model, _ = make_model(tiny_base)
    text, new = model.llm.get_input_embeddings().weight, model.vocab_new_rows.embed.weight
    spread = (new - text.mean(0)).norm(dim=1).mean() / (text - text.mean(0)).norm(dim=1).mean()
    assert 0.8 < spread < 1.2, f"new input rows at {spread:.3f} x the text rows' spread"
    assert torch.cdist(new[:16], new[:16]).fill_diagonal_(1.0).min() > 0.1 * text.std()
    head_text, head_new = model.llm.get_output_embeddings().weight, model.vocab_new_rows.head.weight
    torch.testing.assert_close(head_new.mean(0), head_text.mean(0), atol=1e-3, rtol=0)
    assert (head_new - head_text.mean(0)).abs().max() < 1e-3 * head_text.std()
    assert not torch.equal(head_new[0], head_new[1]), "rows must differ to break symmetry"


def test_mean_embed_init_is_transformers_mean_resizing(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.llm_dir)
    layout = extend_tokenizer(tokenizer, CODEBOOK, 128)
    spec = MavenSpec(selector_hidden_size=16, num_codes=NUM_CODES, eos_token_id=tokenizer.eos_token_id)
    model = MavenModel.from_base(tiny_base.llm_dir, tiny_base.tower_dir, layout, spec, embed_init="mean")
    text, new = model.llm.get_input_embeddings().weight, model.vocab_new_rows.embed.weight
    assert (new - text.mean(0)).abs().max() < 1e-3 * text.std()


def test_save_pretrained_round_trip_gives_identical_logits(tiny_base, tmp_path):
    model, tokenizer = make_model(tiny_base)
    with torch.no_grad():  # make selector/projector/new rows non-trivial before saving
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    batch = make_batch(model)
    model.eval()
    model.save_pretrained(tmp_path / "maven", tokenizer)
    loaded = MavenModel.from_pretrained(tmp_path / "maven").eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(model(batch).loss, loaded(batch).loss)
        ids = torch.tensor([[1, 5, 6, model.layout.code_offset + 3, model.layout.img_end_id]])
        ours = model.logits(model.llm.model(inputs_embeds=model.embed_tokens(ids)).last_hidden_state)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "maven" / "llm")(ids).logits
    torch.testing.assert_close(hf, ours, rtol=0, atol=0)
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "maven" / "llm")
    assert len(hf_tokenizer) == len(tokenizer)


def test_text_only_batch_still_runs_the_visual_path(tiny_base):
    """ZeRO-3 needs every rank to run the same modules: a text-only batch uses a blank image at weight 0."""
    model, _ = make_model(tiny_base)
    apply_trainable(model, ["projector", "llm"])
    batch = make_batch(model)
    text_only = Batch(
        pixel_values=batch.pixel_values[:0],
        image_codes=batch.image_codes[:0],
        input_ids=batch.input_ids[2:],
        labels=batch.labels[2:],
        attention_mask=batch.attention_mask[2:],
    )
    out = model(text_only)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and not p.grad.abs().sum() for p in model.projector.parameters())
