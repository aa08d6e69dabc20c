"""One process honours ``stage.dtype`` (issue 23, finding 3): bf16 weights, fp32 masters, RoPE in fp32.

Before, the one-process engine trained in fp32 whatever the recipe said: flash-attn refuses fp32 inputs and a
7B stage did not fit one GPU. Now its model runs in bf16 and AdamW updates fp32 copies of the trainable
parameters (as DeepSpeed's bf16 engines do); losses stay close to fp32's, frozen weights are the fp32 ones
rounded once, and a checkpoint restores the masters exactly.
"""

from __future__ import annotations

import pytest
import torch

from maven_dist.model.parts import apply_trainable, part_of
from maven_dist.model.rope import rotary_modules
from maven_dist.parallel.local import LocalEngine
from tests.distributed.engine_fixtures import build_stage_setup, micro_batches
from tests.helpers.steps import manifest_for, train_steps

STEPS = 3
BF16_RTOL = 2e-2


def engine_for(base_dir, dtype: str):
    setup = build_stage_setup(base_dir, "stage4", overrides=[f"stage.dtype={dtype}"])
    model = setup.builder()
    apply_trainable(model, setup.cfg.stage.trainable)
    return setup, LocalEngine(model, setup.cfg.stage, total_steps=STEPS, accumulation=2)


@pytest.fixture(scope="module")
def runs(tiny_base):
    base_dir = tiny_base.llm_dir.parent
    out = {}
    for dtype in ("fp32", "bf16"):
        setup, engine = engine_for(base_dir, dtype)
        initial = {k: v.clone() for k, v in engine.module.state_dict().items()}
        batches = micro_batches(setup, STEPS * 2)
        losses, _ = train_steps(engine, lambda s, b=batches: b[s * 2 : s * 2 + 2], range(STEPS))
        out[dtype] = (setup, engine, initial, losses, batches)
    return out


def test_bf16_stage_runs_in_bf16_with_fp32_rope_and_masters(runs):
    _, engine, initial, _, _ = runs["bf16"]
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
    rotary = rotary_modules(engine.module)
    assert rotary and all(r.inv_freq.dtype == torch.float32 for r in rotary)
    fp32_rope = rotary_modules(runs["fp32"][1].module)[0].inv_freq
    assert all(torch.equal(r.inv_freq, fp32_rope) for r in rotary)
    masters = dict(engine.masters.named_parameters())
    assert {m.dtype for m in masters.values()} == {torch.float32}
    trainable = set(engine.cfg.trainable)
    for name, param in engine.module.named_parameters():
        if part_of(name) in trainable:
            assert torch.equal(param, masters[name].to(torch.bfloat16)), name  # the rounded master
        else:
            assert name not in masters and torch.equal(param, initial[name]), name  # frozen: untouched


def test_bf16_losses_stay_close_to_fp32(runs):
    torch.testing.assert_close(
        torch.tensor(runs["bf16"][3]), torch.tensor(runs["fp32"][3]), rtol=BF16_RTOL, atol=0
    )


def test_bf16_checkpoint_restores_the_fp32_masters(runs, tiny_base, tmp_path):
    _, engine, _, _, batches = runs["bf16"]
    engine.save(tmp_path)
    fresh = engine_for(tiny_base.llm_dir.parent, "bf16")[1]
    fresh.load(tmp_path, manifest_for(1))
    for (name, a), (_, b) in zip(
        engine.masters.named_parameters(), fresh.masters.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    extra = lambda s, b=batches: b[:2]  # noqa: E731 - one more step on both
    assert train_steps(engine, extra, range(1))[0] == train_steps(fresh, extra, range(1))[0]
