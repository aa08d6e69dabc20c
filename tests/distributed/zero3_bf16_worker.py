"""Worker for test_zero3_bf16.py: the tiny stage 4 under ZeRO-3 in bf16 on 2 gloo ranks.

argv: BASE_DIR BIN_LLM_DIR OUT_FILE STEPS. For each of the two LLM directories (the base's safetensors, and
the same weights as Vicuna v1.5 ships them: fp16 ``pytorch_model.bin``) an engine is built in bf16; rank 0
records every LLM weight that differs from its file's tensor cast to bf16, and the dtype and values of RoPE's
``inv_freq``. The ``.bin`` engine then trains STEPS steps (rank r takes micro-batch r of each step).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import AutoConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

from maven_dist.model import hf_layout  # noqa: E402
from maven_dist.model.rope import rotary_modules  # noqa: E402
from maven_dist.parallel.dims import ParallelDims  # noqa: E402
from maven_dist.parallel.distributed import init_distributed  # noqa: E402
from maven_dist.parallel.zero3 import Zero3Engine  # noqa: E402
from tests.distributed.engine_fixtures import build_stage_setup, micro_batches  # noqa: E402
from tests.helpers.steps import train_steps  # noqa: E402


def weights_off_the_file(engine: Zero3Engine, llm_dir: Path) -> list[str]:
    """Names of the LLM weights whose gathered bf16 value is not the file's tensor cast to bf16 (rank 0)."""
    state = engine.export_state_dict()
    if state is None:
        return []
    bad = []
    for key, tensor in hf_layout.iter_checkpoint_tensors(llm_dir):
        for name, value in hf_layout.from_hf_layout(
            hf_layout.LLM_DIR, key, tensor, engine.module.layout
        ).items():
            got = state[name]
            if got.dtype != torch.bfloat16 or not torch.equal(got, value.to(torch.bfloat16)):
                bad.append(f"{name} ({got.dtype})")
    return bad


def rope_report(engine: Zero3Engine, llm_dir: Path) -> dict:
    want = LlamaRotaryEmbedding(AutoConfig.from_pretrained(llm_dir)).inv_freq  # plain fp32, no zero.Init
    rotary = rotary_modules(engine.module)
    return {
        "count": len(rotary),
        "dtypes": [str(r.inv_freq.dtype) for r in rotary],
        "equal": all(torch.equal(r.inv_freq, want) for r in rotary),
    }


def main() -> None:
    base_dir, bin_dir, out_file, steps = (
        Path(sys.argv[1]),
        Path(sys.argv[2]),
        Path(sys.argv[3]),
        int(sys.argv[4]),
    )
    env = init_distributed()
    result: dict = {}
    for source, llm_dir in (("safetensors", base_dir / "llm"), ("bin", bin_dir)):
        setup = build_stage_setup(base_dir, "stage4", llm_dir=llm_dir, overrides=["stage.dtype=bf16"])
        dims = ParallelDims.build(setup.cfg.parallel, env.world_size)
        accumulation = dims.accumulation_steps(
            setup.cfg.stage.global_batch_size, setup.cfg.stage.micro_batch_size
        )
        engine = Zero3Engine(setup.builder, setup.cfg, dims, total_steps=steps, accumulation=accumulation)
        result[source] = {
            "off_the_file": weights_off_the_file(engine, llm_dir),
            "rope": rope_report(engine, llm_dir),
        }
        if source == "bin":
            batches = micro_batches(setup, steps * 2)
            losses, _ = train_steps(engine, lambda s, b=batches: [b[s * 2 + env.rank]], range(steps))
            result["losses"] = losses
    if env.rank == 0:
        torch.save(result, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
