"""Where the one-process and ZeRO-3 engines get h_eos from (maven_dist/parallel/h_eos.py), in one process:
a frozen stage's cache (filled once, kept on disk under the model's fingerprint, a miss computed on the
spot) and stage 4's one pass per step give the former per-micro-batch losses within 1e-6."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from maven_dist.model.parts import apply_trainable
from maven_dist.parallel.h_eos import HEosCache, PerStepHEos
from maven_dist.parallel.local import LocalEngine
from tests.distributed.engine_fixtures import build_stage_setup, micro_batches
from tests.helpers.steps import train_steps

STEPS = 2


def engine_for(base_dir, stage: str):
    setup = build_stage_setup(base_dir, stage)
    model = setup.builder()
    apply_trainable(model, setup.cfg.stage.trainable)
    engine = LocalEngine(model, setup.cfg.stage, total_steps=STEPS + 1, accumulation=2)
    passes = []
    original = model.eos_states
    model.eos_states = lambda codes: passes.append(len(codes)) or original(codes)
    return setup, engine, passes


def run(engine, batches) -> list[float]:
    return train_steps(engine, lambda s: batches[s * 2 : s * 2 + 2], range(STEPS))[0]


@pytest.mark.parametrize("stage", ["stage1", "stage3", "stage4"])
def test_losses_equal_the_per_micro_batch_pass(tiny_base, tmp_path, stage):
    base_dir = tiny_base.llm_dir.parent
    setup, former, former_passes = engine_for(base_dir, stage)
    former.h_eos = None  # every forward runs its own pass, as before
    _, engine, passes = engine_for(base_dir, stage)
    batches = micro_batches(setup, STEPS * 2)
    if stage == "stage4":
        assert isinstance(engine.h_eos, PerStepHEos)
    else:
        assert isinstance(engine.h_eos, HEosCache)
        engine.prepare_h_eos(lambda: torch.cat([b.image_codes for b in batches]).numpy(), tmp_path)
        filled = len(passes)
        assert filled == 1  # 12 images, PASS_IMAGES at a time
    want, got = run(former, batches), run(engine, batches)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=0)
    assert len(former_passes) == 2 * STEPS  # one per micro-batch
    assert len(passes) == (STEPS if stage == "stage4" else filled)  # one per step; none at all


def test_the_cache_is_kept_on_disk_by_model_and_computes_a_miss(tiny_base, tmp_path):
    base_dir = tiny_base.llm_dir.parent
    setup, engine, passes = engine_for(base_dir, "stage3")
    batches = micro_batches(setup, 2)
    codes = torch.cat([b.image_codes for b in batches]).numpy()
    engine.prepare_h_eos(lambda: codes, tmp_path)
    (directory,) = [d for d in tmp_path.iterdir() if d.is_dir()]  # named by the model's fingerprint
    assert [f.name for f in directory.iterdir()] == ["rank0-of-1.safetensors"] and len(passes) == 1
    _, again, again_passes = engine_for(base_dir, "stage3")
    again.prepare_h_eos(lambda: codes, tmp_path)
    assert again_passes == [] and len(again.h_eos) == len(np.unique(codes, axis=0))  # read back
    unseen = dataclasses.replace(batches[0], image_codes=(batches[0].image_codes + 1) % 64)
    (h_eos,) = again.h_eos.for_step([unseen])
    assert again_passes == [3] and torch.equal(h_eos, again.module.eos_states(unseen.image_codes))
