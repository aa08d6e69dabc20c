"""h_eos without the extra all-gather under ZeRO-3 (issue 23, finding 6), through bench/h_eos_gathers.py at
tiny size on 2 gloo ranks, every parameter partitioned and released as at 7B: stages 1 and 3 (frozen LLM)
read a cache filled before the first step and gather nothing for h_eos; stage 4 runs one pass per optimizer
step instead of one per micro-batch; the losses are the former path's within 1e-6 (here: bitwise)."""

from __future__ import annotations

import pytest

from bench import h_eos_gathers

ACCUMULATION = 2


@pytest.mark.distributed
def test_h_eos_costs_no_gather_in_frozen_stages_and_one_pass_per_step_in_stage4():
    figures = h_eos_gathers.main(
        [
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--accumulation",
            str(ACCUMULATION),
            "--stages",
            "stage1",
            "stage3",
            "stage4",
        ]
    )
    for stage, arms in figures["stages"].items():
        before, now = arms["per_micro_batch"], arms["now"]
        assert arms["max_loss_diff"] <= 1e-6, (stage, before["losses"], now["losses"])
        assert before["h_eos_passes_per_step"] == ACCUMULATION and before["h_eos_gathered_mb_per_step"] > 0, (
            stage
        )
        if stage in ("stage1", "stage3"):
            assert now["h_eos_passes_per_step"] == 0 and now["h_eos_gathered_mb_per_step"] == 0, (stage, now)
            assert now["gathered_mb_per_step"] < before["gathered_mb_per_step"], (stage, before, now)
        else:
            assert now["h_eos_passes_per_step"] == 1, now
            assert (
                now["h_eos_gathered_mb_per_step"]
                <= before["h_eos_gathered_mb_per_step"] / ACCUMULATION + 1e-9
            )
