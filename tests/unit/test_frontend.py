"""The MaVEn front end: the h_eos input, the discrete view guiding the selection in every stage, the metrics."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoTokenizer

from maven_dist.config import load_config
from maven_dist.contract.batch import Batch
from maven_dist.contract.vocab import extend_tokenizer
from maven_dist.model.frontend import eos_input_length, h_eos_spread
from maven_dist.model.maven import MavenModel
from maven_dist.model.selector import selector_metrics
from maven_dist.model.spec import MavenSpec
from tests.helpers.batches import make_batch

NUM_CODES, CODEBOOK = 8, 64


@pytest.fixture(scope="module")
def model(tiny_base) -> MavenModel:
    """The tiny model as the first stage starts it: base LLM and tower, new rows from the default init."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.llm_dir)
    layout = extend_tokenizer(tokenizer, CODEBOOK, 128)
    spec = MavenSpec(
        keep_ratio=0.25,
        selector_hidden_size=16,
        num_codes=NUM_CODES,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return MavenModel.from_base(tiny_base.llm_dir, tiny_base.tower_dir, layout, spec, seed=0).eval()


def batch_of(model: MavenModel, seed: int = 0) -> Batch:
    tower = model.vision_tower
    return make_batch(model, NUM_CODES, tower.tower.config.image_size, tower.num_patches, seed)


def with_codes_of_image0_changed(batch: Batch) -> Batch:
    codes = batch.image_codes.clone()
    codes[0] = (codes[0] + 17) % CODEBOOK
    return Batch(batch.pixel_values, codes, batch.input_ids, batch.labels, batch.attention_mask)


def test_the_h_eos_input_is_bos_then_the_discrete_block_then_eos(model):
    """Pinned: ``<s> <img> c_1 .. c_K </img> </s>`` (docs: the LLM sees every image after BOS in training)."""
    layout, spec = model.layout, model.spec
    codes = torch.tensor([[0, 5, 63, 1, 2, 3, 4, 7]])
    expected = [spec.bos_token_id, layout.img_start_id, *(layout.code_offset + codes[0]).tolist()]
    expected += [layout.img_end_id, spec.eos_token_id]
    assert model.eos_input_ids(codes).tolist() == [expected]
    assert eos_input_length(spec) == len(expected) == NUM_CODES + 4
    no_bos = MavenSpec(num_codes=NUM_CODES, eos_token_id=spec.eos_token_id, bos_token_id=None)
    assert eos_input_length(no_bos) == NUM_CODES + 3


@pytest.mark.parametrize("stage", ["stage1", "stage3", "stage4"])
def test_one_image_s_codes_steer_its_h_eos_and_its_kept_patches(model, stage):
    """Change image 0's codes: its h_eos and its selection change, image 1's stay, in each stage that
    runs the selector (stage 3 feeds no discrete block, yet its selection follows the codes)."""
    views = load_config(f"tests/recipes/tiny/{stage}.yaml").stage.views
    batch = batch_of(model)
    changed = with_codes_of_image0_changed(batch)
    with torch.no_grad():
        h, h2 = model.eos_states(batch.image_codes), model.eos_states(changed.image_codes)
        features = model.vision_tower(batch.pixel_values)
        if stage == "stage1":
            before, after = model.selector(features, h), model.selector(features, h2)
        else:
            assert model.selects_patches(views)
            before, after = model.selected_patches(features, h), model.selected_patches(features, h2)
            seq, seq2 = (
                model.sequence_inputs(batch, views, model.eos_states),
                model.sequence_inputs(changed, views, model.eos_states),
            )
            assert not torch.equal(seq.embeds, seq2.embeds)
    assert not torch.allclose(h[0], h2[0]), "image 0's h_eos ignores its codes"
    torch.testing.assert_close(h[1:], h2[1:], rtol=0, atol=0)
    assert not torch.equal(before[0], after[0]), f"{stage}: image 0's selection ignores its codes"
    assert torch.equal(before[1:], after[1:])


def test_stage3_and_stage4_keep_the_same_patches_of_the_same_image(model):
    """Same weights, same image: the continuous block of stage 3 is the tail of stage 4's visual block."""
    batch = batch_of(model, seed=3)
    h = model.eos_states(batch.image_codes)
    with torch.no_grad():
        stage3 = model.visual_embeds(batch.pixel_values, batch.image_codes, h, ["continuous"])
        stage4 = model.visual_embeds(batch.pixel_values, batch.image_codes, h, ["discrete", "continuous"])
    torch.testing.assert_close(stage3, stage4[:, NUM_CODES + 2 :], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("keep_ratio", "views", "runs"),
    [
        (0.25, ("discrete", "continuous"), True),
        (0.25, ("continuous",), True),
        (1.0, ("discrete", "continuous"), False),
        (0.25, ("discrete",), False),
    ],
)
def test_the_h_eos_pass_is_one_gradient_free_batch_of_every_image_and_only_where_the_selector_runs(
    model, keep_ratio, views, runs
):
    """The LLM runs on the h_eos inputs of all the micro-batch's images at once, without autograd, and
    not at all when alpha = 1 (every patch kept) or without the continuous view (nothing to select)."""
    batch = batch_of(model)
    calls: list[tuple[tuple[int, ...], bool]] = []

    def record(module, args, kwargs):
        calls.append((tuple(kwargs["inputs_embeds"].shape[:2]), torch.is_grad_enabled()))

    spec = model.spec
    model.spec = dataclasses.replace(spec, keep_ratio=keep_ratio)
    hook = model.llm.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        assert model.selects_patches(views) == runs
        out = model(batch, views=views, loss="lm")
    finally:
        hook.remove()
        model.spec = spec
    eos_shape = (batch.num_images, eos_input_length(spec))
    assert calls[:-1] == ([(eos_shape, False)] if runs else []), calls
    assert calls[-1][1], "the training pass runs with autograd"
    assert ("selector/h_eos_spread" in out.metrics) == runs


def test_h_eos_spread_is_zero_without_image_dependence_and_large_at_the_default_init(model):
    assert float(h_eos_spread(torch.ones(4, 3))) == 0.0
    # std per dimension over images (population): [1, 0] -> mean 0.5; rms sqrt(2/4) -> 0.5 / 0.7071
    assert float(h_eos_spread(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))) == pytest.approx(0.5 / 0.5**0.5)
    assert h_eos_spread(torch.ones(1, 3)) is None
    spread = float(h_eos_spread(model.eos_states(batch_of(model).image_codes)))
    assert spread >= 0.05, f"h_eos barely varies with the image at the default init: {spread:.2e}"


def test_precision_and_recall_at_k_of_the_top_k_selection():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    labels = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]])
    # keep 2: row 0 keeps {0, 1} (1 labelled), row 1 keeps {2, 3} (1 labelled) -> p@k 2/4; labelled 3 -> r@k 2/3
    metrics = selector_metrics(logits, labels, threshold=0.5, keep=2)
    assert float(metrics["selector/precision_at_k"]) == pytest.approx(0.5)
    assert float(metrics["selector/recall_at_k"]) == pytest.approx(2 / 3)
    # threshold 0.5 on sigmoid: every logit > 0 -> all 8 predicted, 3 right
    assert float(metrics["selector/precision"]) == pytest.approx(3 / 8)
