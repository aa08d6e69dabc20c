"""Worker for test_3d_bf16.py: the tiny MaVEn on the 3D backend in bf16, pp=2 on 2 gloo ranks.

argv: MAVEN_DIR OUT_FILE STEPS. For stage 3 (only the projector trains, on pipeline stage 0: stage 1 trains
nothing, the ZeRO-less path) and stage 4 (both stages train: ZeRO-1): the h_eos pipeline pass (stage 0
sends bf16 activations, stage 1 receives them, the last stage broadcasts h_eos back), then STEPS training
steps. Rank 0 writes the parameters' dtypes, the ZeRO stage, h_eos and the losses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from maven_dist.parallel.dims import ParallelDims  # noqa: E402
from maven_dist.parallel.distributed import init_distributed  # noqa: E402
from maven_dist.parallel.three_d import ThreeDEngine  # noqa: E402
from tests.distributed.three_d_worker import GLOBAL, MICRO, micro_batches, stage_config  # noqa: E402
from tests.helpers.steps import train_steps  # noqa: E402


def main() -> None:
    maven_dir, out_file, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    env = init_distributed()
    result = {}
    for stage in ("stage3", "stage4"):
        cfg = stage_config(stage, tp=1, pp=2, extra=("stage.dtype=bf16",))
        dims = ParallelDims.build(cfg.parallel, env.world_size)
        accumulation = dims.accumulation_steps(cfg.stage.global_batch_size, cfg.stage.micro_batch_size)
        engine = ThreeDEngine(maven_dir, cfg, dims, total_steps=steps, accumulation=accumulation)
        tower = engine.module.vision_tower
        batches = micro_batches(
            engine.layout, tower.tower.config.image_size, tower.num_patches, steps * GLOBAL // MICRO
        )
        h_eos = engine.eos_states(batches[0].image_codes)
        losses, _ = train_steps(
            engine, lambda s, b=batches, a=accumulation: b[s * a : (s + 1) * a], range(steps)
        )
        result[stage] = {
            "zero_stage": engine.zero_stage,
            "dtypes": sorted({str(p.dtype) for p in engine.pipe.parameters()}),
            "h_eos": h_eos.float().cpu(),
            "losses": losses,
        }
    if env.rank == 0:
        torch.save(result, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
