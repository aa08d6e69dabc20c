"""Sequence packing: a packed micro-batch computes the unpacked one's loss and gradients; the planner keeps
its budgets and plans every sample once; the collator lays samples out as the model expects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maven_dist.config import ConfigError, load_config
from maven_dist.contract.batch import Batch
from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from maven_dist.data.formats import Example, collate
from maven_dist.data.image_transform import ImageTransform
from maven_dist.data.packing import PackingBudget, collate_packed, pack_micro_batches
from maven_dist.model.maven import MavenModel
from maven_dist.model.packing import block_causal_mask, packed_position_ids
from tests.helpers.batches import make_batch
from tests.helpers.models import FLASH_RUNS, NUM_CODES, tiny_maven


@pytest.fixture(scope="module")
def models(tiny_base) -> dict[str, MavenModel]:
    return {attn: tiny_maven(tiny_base, attn) for attn in ("sdpa", "eager")}


def examples_of(batch: Batch, tokens_per_image: int) -> list[Example]:
    """The samples of an unpacked batch as the loader's examples (one per row, images in order)."""
    out, image = [], 0
    for b, sample_id in enumerate(batch.sample_ids):
        real = batch.attention_mask[b].bool()
        ids, labels = batch.input_ids[b][real].tolist(), batch.labels[b][real].tolist()
        n = ids.count(IMAGE_PLACEHOLDER_ID)
        out.append(
            Example(
                sample_id,
                pixel_values=list(batch.pixel_values[image : image + n]),
                image_codes=batch.image_codes[image : image + n].tolist(),
                input_ids=ids,
                labels=labels,
                length=len(ids) + n * (tokens_per_image - 1),
            )
        )
        image += n
    return out


def mixed_examples(model: MavenModel) -> list[Example]:
    """Six samples: an image mid-text, two images, caption -> codes (no image input) and the same three
    again, other tokens, other images."""
    tower = model.vision_tower
    size, patches = tower.tower.config.image_size, tower.num_patches
    per_image = NUM_CODES + 2 + model.num_kept
    return [
        e
        for seed in (0, 1)
        for e in examples_of(make_batch(model, NUM_CODES, size, patches, seed), per_image)
    ]


def both_ways(examples: list[Example], rows: list[list[int]], size: int) -> tuple[Batch, Batch]:
    """The same samples one per row (row-major order of `rows`) and packed as `rows` says."""
    transform = ImageTransform(size)
    ordered = [examples[i] for row in rows for i in row]
    packed = collate_packed([[examples[i] for i in row] for row in rows], 0, transform, row_length=4096)
    return collate(ordered, 0, transform), packed


def loss_and_grads(model: MavenModel, batch: Batch) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(batch, views=("discrete", "continuous"), loss="lm")
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), out.num_tokens, grads


PLANS = {
    "mixed rows": [[0, 2, 4], [1, 5], [3]],
    "one row": [[0, 1, 2, 3, 4, 5]],
    "text only": [[2, 5]],  # no image in the micro-batch: the blank image of weight 0 runs
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("plan", list(PLANS))
def test_packed_loss_and_every_gradient_equal_the_unpacked_ones(models, attn, plan):
    model = models[attn]
    examples = mixed_examples(model)
    unpacked, packed = both_ways(examples, PLANS[plan], model.vision_tower.tower.config.image_size)
    assert packed.input_ids.shape[0] == len(PLANS[plan]) and packed.num_samples == unpacked.num_samples
    want_loss, want_tokens, want = loss_and_grads(model, unpacked)
    got_loss, got_tokens, got = loss_and_grads(model, packed)
    assert got_tokens == want_tokens > 0
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert set(got) == set(want)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_a_sample_does_not_see_its_row_neighbours(models):
    """Changing the first sample of a row changes nothing the second computes."""
    model = models["sdpa"]
    examples = mixed_examples(model)
    size = model.vision_tower.tower.config.image_size
    _, packed = both_ways(examples, [[0, 1]], size)
    _, changed = both_ways(examples, [[3, 1]], size)  # same length as 0, other tokens and image
    with torch.no_grad():
        hidden, inputs = model.lm_hidden(packed, ("discrete", "continuous"))
        hidden_changed, inputs_changed = model.lm_hidden(changed, ("discrete", "continuous"))
    second = inputs.segment_ids[0] == 1
    assert torch.equal(second, inputs_changed.segment_ids[0] == 1) and second.any()
    torch.testing.assert_close(hidden[0, second], hidden_changed[0, second], rtol=1e-5, atol=1e-5)


def test_positions_restart_and_the_mask_is_block_diagonal_causal():
    segments = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [2, 2, 3, 3, 3, 3, 3]])
    assert packed_position_ids(segments).tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 4]]
    mask = block_causal_mask(segments, torch.float32, additive=False)[0, 0].int()
    assert mask.tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],  # padding sees itself: no query without a key
        [0, 0, 0, 0, 0, 1, 1],
    ]
    additive = block_causal_mask(segments, torch.float32, additive=True)
    assert torch.equal(additive == 0, block_causal_mask(segments, torch.float32, additive=False))


def test_the_collator_numbers_samples_row_major_and_moves_what_overflows(models):
    model = models["sdpa"]
    examples = mixed_examples(model)
    size = model.vision_tower.tower.config.image_size
    _, packed = both_ways(examples, PLANS["mixed rows"], size)
    assert packed.sample_ids == [examples[i].sample_id for i in (0, 2, 4, 1, 5, 3)]
    for r, row in enumerate(PLANS["mixed rows"]):
        used = sum(len(examples[i].input_ids) for i in row)
        ids = packed.segment_ids[r]
        assert (ids[:used] >= 0).all() and (ids[used:] == -1).all()
        assert (packed.attention_mask[r] == (ids >= 0)).all()
    # Every sample's first token is unlabelled after assembly: the previous sample's last token predicts nothing.
    with torch.no_grad():
        inputs = model.sequence_inputs(packed, ("discrete", "continuous"), model.eos_states)
    starts = torch.ones_like(inputs.segment_ids, dtype=torch.bool)
    starts[:, 1:] = inputs.segment_ids[:, 1:] != inputs.segment_ids[:, :-1]
    assert (inputs.labels[starts & (inputs.segment_ids >= 0)] == IGNORE_INDEX).all()
    # A row planned too long (an estimate below the truth) hands what overflows to a row with room.
    row = [examples[0], examples[2], examples[4]]
    limit = max(row[0].length + row[1].length, row[2].length)
    refit = collate_packed([row], 0, ImageTransform(size), limit)
    assert refit.segment_ids.shape[0] == 2 and refit.sample_ids == [e.sample_id for e in row]


def test_the_planner_keeps_every_budget_and_plans_each_sample_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, 500)
    lengths[7] = 900  # longer than a row: a row of its own (skipped when decoded)
    images = rng.integers(0, 3, 500)
    budget = PackingBudget(rows=4, row_length=512, max_images=10)
    order = rng.permutation(500)
    batches = pack_micro_batches(order, lengths, images, budget)
    flat = [i for batch in batches for row in batch for i in row]
    assert sorted(flat) == list(range(500))
    for batch in batches:
        assert 1 <= len(batch) <= budget.rows
        assert sum(int(images[i]) for row in batch for i in row) <= budget.max_images
        for row in batch:
            assert sum(int(lengths[i]) for i in row) <= budget.row_length or row == [7]
    assert [7] in [row for batch in batches for row in batch]
    assert pack_micro_batches(order, lengths, images, budget) == batches  # a pure function
    # Bound by positions only, rows of 1024 are well filled: 1% of their positions are padding on this mix
    # (the last micro-batch, which takes what is left, aside).
    unbounded = pack_micro_batches(order, lengths, images, PackingBudget(rows=4, row_length=1024))[:-1]
    used = sum(int(lengths[i]) for batch in unbounded for row in batch for i in row)
    assert 1 - used / sum(len(batch) * 1024 for batch in unbounded) < 0.02


def test_packing_is_refused_where_it_does_not_apply():
    with pytest.raises(ConfigError, match="parallel.backend=3d"):
        load_config("tests/recipes/tiny/stage4.yaml", ["data.packing=true", "parallel.backend=3d"])
    with pytest.raises(ConfigError, match="data.format=patch_labels"):
        load_config("tests/recipes/tiny/stage1.yaml", ["data.packing=true"])
    with pytest.raises(ConfigError, match="data.pack_max_images"):
        load_config("tests/recipes/tiny/stage4.yaml", ["data.packing=true", "data.pack_max_images=-1"])
    base = load_config("tests/recipes/tiny/stage4.yaml")
    assert (
        base.fingerprint()
        != load_config("tests/recipes/tiny/stage4.yaml", ["data.packing=true"]).fingerprint()
    )


@pytest.mark.gpu
@pytest.mark.skipif(not FLASH_RUNS, reason="needs CUDA and the flash-attn package")
def test_flash_attention_varlen_matches_the_unpacked_loss_on_gpu(tiny_base):
    model = tiny_maven(tiny_base, "flash_attention_2").to("cuda", torch.bfloat16)
    examples = mixed_examples(model)
    unpacked, packed = both_ways(examples, PLANS["mixed rows"], model.vision_tower.tower.config.image_size)
    losses = [float(model(b.to("cuda"), views=("discrete", "continuous")).loss) for b in (unpacked, packed)]
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
