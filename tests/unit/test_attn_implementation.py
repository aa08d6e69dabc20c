"""model.llm.attn_implementation: sdpa and eager agree and train, on both decoders; flash-attn where it runs."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from maven_dist.config import ConfigError, load_config
from maven_dist.model.maven import MavenModel, check_attn_implementation
from maven_dist.parallel.local import LocalEngine
from tests.helpers.batches import make_batch
from tests.helpers.models import FLASH_RUNS, NUM_CODES, tiny_maven
from tests.helpers.steps import train_steps
from tests.unit.test_plan import one_rank_model_parallel  # noqa: F401 (fixture)

TINY = "tests/recipes/tiny/stage4.yaml"


def batches_of(model: MavenModel, n: int) -> list:
    tower = model.vision_tower
    size, patches = tower.tower.config.image_size, tower.num_patches
    return [make_batch(model, NUM_CODES, size, patches, seed=i) for i in range(n)]


def test_sdpa_and_eager_give_the_same_loss_and_each_trains(tiny_base):
    stage = load_config(TINY).stage
    losses = {}
    for attn in ("sdpa", "eager"):
        model = tiny_maven(tiny_base, attn)
        assert model.llm.config._attn_implementation == attn
        batches = batches_of(model, 2)
        engine = LocalEngine(model, stage, total_steps=2, accumulation=1)
        losses[attn], norms = train_steps(engine, lambda step, b=batches: [b[step]], range(2))
        assert all(map(torch.isfinite, torch.tensor(losses[attn] + norms)))
    # Step 0 is the same weights through both kernels; step 1 after one AdamW update from each.
    torch.testing.assert_close(torch.tensor(losses["eager"]), torch.tensor(losses["sdpa"]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("attn", ["eager", *(["flash_attention_2"] if FLASH_RUNS else [])])
def test_the_tiny_recipe_trains_with_each_kernel(tiny_assets, tmp_path, attn):
    """The tiny stage 4, as `maven train` runs it, with a kernel other than the default (sdpa: every other
    stage test). flash-attn needs bf16 and CUDA: only where it runs."""
    from maven_dist.parallel.distributed import destroy
    from maven_dist.train.trainer import run_stage

    sets = [f"model.llm.attn_implementation={attn}", "stage.max_steps=2", "stage.eval_every=0",
            "tracking.enabled=false", "data.num_workers=0", "stage.init_missing=base"]  # fmt: skip
    if attn == "flash_attention_2":
        sets.append("stage.dtype=bf16")
    cfg = load_config(TINY, tiny_assets.overrides(tmp_path / "run", "conversations") + sets)
    try:
        result = run_stage(cfg)
    finally:
        destroy()
    assert result.steps == 2 and math.isfinite(result.final_loss)
    resolved = yaml.safe_load((tmp_path / "run" / "stage4" / "resolved_recipe.yaml").read_text())
    assert resolved["model"]["llm"]["attn_implementation"] == attn


@pytest.mark.skipif(FLASH_RUNS, reason="flash-attn runs here")
def test_flash_attention_is_refused_where_it_cannot_run():
    with pytest.raises(ConfigError, match="flash_attention_2 needs"):
        check_attn_implementation("flash_attention_2")


@pytest.mark.gpu
@pytest.mark.skipif(not FLASH_RUNS, reason="needs CUDA and the flash-attn package")
def test_flash_attention_matches_sdpa_on_gpu(tiny_base):
    batch = batches_of(tiny_maven(tiny_base, "sdpa"), 1)[0].to("cuda")
    losses = {}
    for attn in ("sdpa", "flash_attention_2"):
        model = tiny_maven(tiny_base, attn).to("cuda", torch.bfloat16)
        out = model(batch, views=("discrete", "continuous"), loss="lm")
        out.loss.backward()
        losses[attn] = float(out.loss.detach())
    assert losses["flash_attention_2"] == pytest.approx(losses["sdpa"], rel=2e-2)


def test_config_rules_and_the_fingerprint():
    with pytest.raises(ConfigError, match="parallel.backend=3d"):
        load_config(TINY, ["model.llm.attn_implementation=flash_attention_2", "parallel.backend=3d"])
    with pytest.raises(ConfigError, match="stage.dtype=fp32"):
        load_config(TINY, ["model.llm.attn_implementation=flash_attention_2"])
    with pytest.raises(ConfigError, match="not allowed"):
        load_config(TINY, ["model.llm.attn_implementation=flash"])
    base = load_config(TINY)
    # Another kernel is another recipe (its losses differ in the last bits).
    assert load_config(TINY, ["model.llm.attn_implementation=eager"]).fingerprint() != base.fingerprint()


def test_the_3d_decoder_layer_eager_equals_sdpa(one_rank_model_parallel):  # noqa: F811
    from maven_dist.parallel.megatron_llama import LlamaShape, TPDecoderLayer, build_tp_config

    config = build_tp_config(one_rank_model_parallel)
    shape = LlamaShape(64, 128, 2, 4, 2, 16, 1e-6, 10000.0)
    torch.manual_seed(0)
    sdpa = TPDecoderLayer(shape, config)
    for p in sdpa.parameters():
        torch.nn.init.normal_(p, std=0.1)
    eager = TPDecoderLayer(shape, config, attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    x = torch.randn(3, 20, 64, requires_grad=True)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 15:] = 0  # right padding
    outs, grads = [], []
    for layer in (sdpa, eager):
        out = layer.block(x, mask)
        (out * mask.unsqueeze(-1)).sum().backward()
        outs.append(out[mask.bool()].detach())
        grads.append(x.grad.clone())
        x.grad = None
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="flash_attention_2"):
        TPDecoderLayer(shape, config, attn_implementation="flash_attention_2")
