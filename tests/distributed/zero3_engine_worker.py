"""Worker for test_zero3_engine.py: train a tiny MaVEn under ZeRO-3 on every rank of a gloo group.

argv: BASE_DIR OUT_FILE STAGE STEPS [partitioned]. Rank r takes micro-batch r of each global step;
rank 0 saves the per-step losses (averaged over ranks), the validation losses of the trained model over
the first VAL_BATCHES micro-batches (rank r evaluates every dp-th) and the final gathered weights.

`partitioned`: every parameter is partitioned, however small (stage3_param_persistence_threshold 0),
as the 7B head and embeddings are; at the default threshold the tiny model's all stay whole.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from maven_dist.parallel import zero3  # noqa: E402
from maven_dist.parallel.dims import ParallelDims  # noqa: E402
from maven_dist.parallel.distributed import init_distributed  # noqa: E402
from maven_dist.parallel.zero3 import Zero3Engine  # noqa: E402
from tests.distributed.engine_fixtures import build_stage_setup, micro_batches  # noqa: E402
from tests.helpers.steps import train_steps  # noqa: E402

VAL_BATCHES = 4


def main() -> None:
    base_dir, out_file, stage, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    env = init_distributed()
    if sys.argv[5:] == ["partitioned"]:
        build = zero3.build_ds_config

        def partition_everything(*args, **kwargs) -> dict:
            config = build(*args, **kwargs)
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
            return config

        zero3.build_ds_config = partition_everything
    setup = build_stage_setup(base_dir, stage)
    dims = ParallelDims.build(setup.cfg.parallel, env.world_size)
    accumulation = dims.accumulation_steps(
        setup.cfg.stage.global_batch_size, setup.cfg.stage.micro_batch_size
    )
    engine = Zero3Engine(setup.builder, setup.cfg, dims, total_steps=steps, accumulation=accumulation)
    batches = micro_batches(setup, steps * 2)

    def mine(step: int) -> list:
        return [batches[step * 2 + a * dims.dp + env.rank] for a in range(accumulation)]

    losses, _ = train_steps(engine, mine, range(steps))
    val = engine.evaluate(b for k, b in enumerate(batches[:VAL_BATCHES]) if k % dims.dp == env.rank)
    state = engine.export_state_dict()
    if env.rank == 0:
        torch.save({"losses": losses, "val": val, "state": state}, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
