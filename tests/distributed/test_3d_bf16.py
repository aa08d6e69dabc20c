"""The 3D backend in bf16, pp=2 on gloo (issue 23, finding 4).

The h_eos pipeline pass received and broadcast into fp32 buffers while the stages sent bf16 activations (a
garbage h_eos, or NCCL hung on the size mismatch); DeepSpeed wrapped a bf16 pipeline's optimizer in its
BF16_Optimizer where a stage trains nothing, which fails there and bypasses the grid-wide clipping. Both
stages (one with an empty pipeline stage, one under ZeRO-1) must run in bf16 and track fp32's h_eos and losses.
"""

from __future__ import annotations

import pytest
import torch

from maven_dist.model.maven import MavenModel
from tests.distributed.test_3d_engine import STEPS, maven_dir, reference  # noqa: F401 - fixture
from tests.distributed.three_d_worker import micro_batches
from tests.helpers.torchrun import torchrun

BF16_RTOL = 2e-2


@pytest.mark.distributed
def test_3d_pp2_bf16_passes_h_eos_in_bf16_and_trains_close_to_fp32(maven_dir, tmp_path):  # noqa: F811
    out = tmp_path / "3d_bf16.pt"
    torchrun(2, ["tests/distributed/three_d_bf16_worker.py", str(maven_dir), str(out), str(STEPS)])
    result = torch.load(out, weights_only=True)
    model = MavenModel.from_pretrained(maven_dir)
    tower = model.vision_tower
    codes = micro_batches(model.layout, tower.tower.config.image_size, tower.num_patches, 1)[0].image_codes
    want = model.eos_states(codes)
    for stage, zero_stage in (("stage3", 0), ("stage4", 1)):
        got = result[stage]
        assert got["zero_stage"] == zero_stage and got["dtypes"] == ["torch.bfloat16"], got
        err = float((got["h_eos"] - want).norm() / want.norm())
        assert err < BF16_RTOL, f"{stage}: h_eos off fp32's by {err:.2e}"
        torch.testing.assert_close(
            torch.tensor(got["losses"]),
            torch.tensor(reference(maven_dir, stage)["losses"]),
            rtol=BF16_RTOL,
            atol=0,
        )
