"""A ZeRO-3 stage in bf16 on CPU: the casts a GPU run makes, checked where they can be (issue 23, finding 2).

``deepspeed.zero.Init`` replaces torch's tensor constructors while the model is built (device and dtype
forced). Whatever runs inside it besides module construction is damaged: a ``.bin`` checkpoint's fp16
storages rebuilt as bf16 tensors (garbage weights, no error), RoPE's fp32 ``arange`` turned bf16, a CPU
generator's ``randn`` sent to CUDA. The weights must equal the files' tensors cast to bf16 exactly, from
safetensors and from Vicuna v1.5's fp16 ``pytorch_model.bin``; ``inv_freq`` must be fp32 and equal to the
plain fp32 computation; the losses must stay close to fp32's.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from maven_dist.model.parts import apply_trainable
from maven_dist.parallel.local import LocalEngine
from tests.distributed.engine_fixtures import build_stage_setup, micro_batches
from tests.helpers.steps import train_steps
from tests.helpers.torchrun import torchrun

STEPS = 3
BF16_RTOL = 2e-2
"""bf16 keeps 8 significant bits: a tiny model's loss moves in the third digit."""


def fp16_bin_copy(llm_dir, out_dir):
    """The LLM directory as Vicuna v1.5 ships it: its weights in fp16 ``pytorch_model.bin``, no safetensors."""
    shutil.copytree(llm_dir, out_dir, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = {k: v.half() for f in sorted(llm_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    torch.save(state, out_dir / "pytorch_model.bin")
    return out_dir


@pytest.mark.distributed
def test_zero3_bf16_loads_the_files_exactly_keeps_rope_fp32_and_trains_close_to_fp32(tiny_base, tmp_path):
    base_dir = tiny_base.llm_dir.parent
    bin_dir = fp16_bin_copy(tiny_base.llm_dir, tmp_path / "llm_bin")
    out = tmp_path / "bf16.pt"
    torchrun(2, ["tests/distributed/zero3_bf16_worker.py", str(base_dir), str(bin_dir), str(out), str(STEPS)])
    result = torch.load(out, weights_only=True)
    for source in ("safetensors", "bin"):
        assert result[source]["off_the_file"] == [], f"{source}: weights differ from the file cast to bf16"
        rope = result[source]["rope"]
        assert rope["count"] >= 1 and set(rope["dtypes"]) == {"torch.float32"} and rope["equal"], (
            source,
            rope,
        )

    # fp32 reference: one process, the same fp16 file, the same micro-batches accumulated over the 2 ranks'.
    setup = build_stage_setup(base_dir, "stage4", llm_dir=bin_dir, overrides=["stage.dtype=fp32"])
    model = setup.builder()
    apply_trainable(model, setup.cfg.stage.trainable)
    engine = LocalEngine(model, setup.cfg.stage, total_steps=STEPS, accumulation=2)
    batches = micro_batches(setup, STEPS * 2)
    ref, _ = train_steps(engine, lambda s: batches[s * 2 : s * 2 + 2], range(STEPS))
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref), rtol=BF16_RTOL, atol=0)
