"""What the h_eos pass costs under ZeRO-3, before and after issue 23: bytes all-gathered and time per step.

The h_eos pass (``MavenModel.eos_states``: the LLM over ``<s> <img> codes </img> </s>`` of every image) is a
forward of the whole LLM, so under ZeRO-3 it gathers every partitioned LLM parameter. Two arms per stage run
on 2 gloo ranks in one process group, from the same weights and on the same micro-batches, alternating:

* ``per_micro_batch`` (the former path): each micro-batch's forward runs its own pass;
* ``now``: stage 1 and 3 (frozen LLM) read h_eos from the stage's cache, filled before the first step;
  stage 4 runs one pass per optimizer step over all of the step's images (``maven_dist/parallel/h_eos.py``).

Every parameter is partitioned (``stage3_param_persistence_threshold`` 0), as a 7B model's are. Counted on
rank 0: bytes DeepSpeed all-gathers per step (its ``all_gather_into_tensor``: the gathered output), the share
gathered while an h_eos pass runs, the passes per step; the losses of both arms (they must agree within
1e-6); the median step time.

    python bench/h_eos_gathers.py                  # cpu preset (768-wide 4-layer LLM), stages 3 and 4
    python bench/h_eos_gathers.py --preset tiny --steps 2 --stages stage1 stage3 stage4
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

try:  # run as a script, bench/ is on sys.path; imported from the repository root (tests), it is not
    import harness
except ModuleNotFoundError:
    from bench import harness

REPO = harness.REPO
STAGES = {
    # what each stage trains and sees (the recipes' stage sections), applied to the preset's stage-4 recipe
    "stage1": ["stage.name=stage1", "stage.loss=selector_bce", "stage.trainable=[selector]", "stage.views=[discrete,continuous]",
               "data.format=patch_labels"],
    "stage3": ["stage.name=stage3", "stage.trainable=[projector]", "stage.views=[continuous]", "data.format=captions",
               "data.template=plain"],
    "stage4": ["stage.name=stage4"],
}  # fmt: skip
ARMS = ("per_micro_batch", "now")
SEVEN_B_PARAMS = 6.74e9


class GatherCounter:
    """Bytes DeepSpeed all-gathers, in total and while an h_eos pass runs (``MavenModel.eos_states``)."""

    def __init__(self):
        self.total = self.h_eos = 0
        self.passes = 0
        self._in_pass = False

    def install(self, modules) -> None:
        from deepspeed.comm import comm

        backend = comm.cdb
        gather = backend.all_gather_function

        def counted(output_tensor, input_tensor, *args, **kwargs):
            nbytes = output_tensor.numel() * output_tensor.element_size()
            self.total += nbytes
            self.h_eos += nbytes if self._in_pass else 0
            return gather(output_tensor, input_tensor, *args, **kwargs)

        backend.all_gather_function = counted
        for module in modules:
            original = module.eos_states

            def eos_states(codes, original=original):
                self.passes += 1
                self._in_pass = True
                try:
                    return original(codes)
                finally:
                    self._in_pass = False

            module.eos_states = eos_states  # the instance attribute wins over the method

    def snapshot(self) -> tuple[int, int, int]:
        return self.total, self.h_eos, self.passes


def random_builder(cfg, text_vocab: int):
    """A ``build_model(copy_fn, construct)`` for Zero3Engine: a seeded random MaVEn of the preset's shapes,
    built whole, then its weights copied into the modules built inside ``construct()`` (zero.Init), as a
    checkpoint's would be."""
    from maven_dist.model.maven import MavenModel
    from maven_dist.model.rope import apply_fp32_rope

    full = harness.build_model(cfg, text_vocab)
    state = full.state_dict()

    def build(copy_fn=None, construct=contextlib.nullcontext):
        llm, tower = full.llm.config, full.vision_tower.tower.config
        with construct():
            model = MavenModel.from_configs(llm, tower, full.layout, full.spec, init_weights=False)
        apply_fp32_rope(model)
        for name, param in model.named_parameters():
            copy_fn(param, state[name])
        return model

    return full, build


def batches_for(model, stage: str, samples: int, text: int, count: int) -> list:
    out = []
    for k in range(count):
        batch = harness.make_batch(model, samples, 1 + k % 2, text)
        if stage == "stage1":
            g = torch.Generator().manual_seed(k)
            labels = (torch.rand(batch.num_images, model.vision_tower.num_patches, generator=g) > 0.7).float()
            batch = dataclasses.replace(batch, patch_labels=labels)
        out.append(batch)
    return out


def run_rank(args) -> None:
    """One rank: both arms of every stage; rank 0 writes the figures to ``args.out``."""
    import torch.distributed as dist

    from maven_dist.parallel import zero3
    from maven_dist.parallel.dims import ParallelDims
    from maven_dist.parallel.distributed import init_distributed
    from maven_dist.parallel.engine import NonFiniteGuard
    from maven_dist.parallel.h_eos import HEosCache

    env = init_distributed()
    build_config = zero3.build_ds_config

    def as_at_7b(*a, **k) -> dict:
        """Every parameter partitioned, and released between its uses, as at 7B: the recipe's live-parameter
        and reuse-distance limits (1e9 elements) are 15% of a 6.7B LLM, so they are scaled to 15% of this
        model (at their face value the whole tiny model would stay gathered for the whole step)."""
        config = build_config(*a, **k)
        zero = config["zero_optimization"]
        limit = int(zero["stage3_max_live_parameters"] / SEVEN_B_PARAMS * model_params)
        zero |= {"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": limit,
                 "stage3_max_reuse_distance": limit}  # fmt: skip
        return config

    zero3.build_ds_config = as_at_7b
    figures: dict = {"hardware": harness.hardware(), "world_size": env.world_size, "stages": {}}
    for stage in args.stages:
        overrides = [*STAGES[stage], f"stage.micro_batch_size={args.samples}", "stage.gradient_checkpointing=false",
                     f"stage.global_batch_size={args.samples * args.accumulation * env.world_size}",
                     "stage.schedule.warmup_ratio=0", f"stage.dtype={args.dtype}"]  # fmt: skip
        cfg, preset = harness.load_preset(args.preset, overrides)
        dims = ParallelDims.build(cfg.parallel, env.world_size)
        engines, counters = {}, {}
        for arm in ARMS:
            full, build = random_builder(cfg, preset.text_vocab)
            model_params = sum(p.numel() for p in full.parameters())
            engine = zero3.Zero3Engine(
                build, cfg, dims, total_steps=args.steps + 1, accumulation=args.accumulation
            )
            counters[arm] = GatherCounter()
            counters[arm].install([engine.module])
            engines[arm] = engine
        batches = batches_for(full, stage, args.samples, args.text, args.accumulation * (args.steps + 1))
        engines["per_micro_batch"].h_eos = None  # the former path: every forward runs its own pass
        prepared_s = 0.0
        if isinstance(engines["now"].h_eos, HEosCache):
            codes = torch.cat([b.image_codes for b in batches]).numpy()
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as cache_dir:
                engines["now"].prepare_h_eos(lambda codes=codes: codes, Path(cache_dir))
            prepared_s = time.perf_counter() - start
        rows = {
            arm: {"losses": [], "step_s": [], "bytes": [], "h_eos_bytes": [], "passes": []} for arm in ARMS
        }
        guard = NonFiniteGuard(max_in_row=1, stage=stage)
        for step in range(args.steps + 1):  # step 0 is a warm-up: not timed, not counted
            step_batches = batches[step * args.accumulation : (step + 1) * args.accumulation]
            for arm in ARMS if step % 2 == 0 else ARMS[::-1]:
                before = counters[arm].snapshot()
                dist.barrier()
                start = time.perf_counter()
                result = engines[arm].train_step(iter(step_batches), guard, step + 1)
                seconds = time.perf_counter() - start
                after = counters[arm].snapshot()
                rows[arm]["losses"].append(result.loss)
                if step:
                    rows[arm]["step_s"].append(seconds)
                    for key, k in (("bytes", 0), ("h_eos_bytes", 1), ("passes", 2)):
                        rows[arm][key].append(after[k] - before[k])
        figures["stages"][stage] = {
            arm: {
                "gathered_mb_per_step": statistics.mean(rows[arm]["bytes"]) / 2**20,
                "h_eos_gathered_mb_per_step": statistics.mean(rows[arm]["h_eos_bytes"]) / 2**20,
                "h_eos_passes_per_step": statistics.mean(rows[arm]["passes"]),
                "step_s": statistics.median(rows[arm]["step_s"]),
                "losses": rows[arm]["losses"],
            }
            for arm in ARMS
        } | {
            "max_loss_diff": max(
                abs(a - b) for a, b in zip(*(rows[arm]["losses"] for arm in ARMS), strict=True)
            ),
            "cache_fill_s": prepared_s,
        }
        del engines
    if env.rank == 0:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def report(figures: dict) -> None:
    print(f"# h_eos under ZeRO-3, {figures['world_size']} ranks: {figures['hardware']}")
    print(
        "| stage | arm | all-gathered / step | of it for h_eos | h_eos passes / step | step | max loss diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for stage, arms in figures["stages"].items():
        for arm in ARMS:
            a = arms[arm]
            print(f"| {stage} | {arm} | {a['gathered_mb_per_step']:.1f} MiB | {a['h_eos_gathered_mb_per_step']:.1f} MiB "
                  f"| {a['h_eos_passes_per_step']:g} | {a['step_s']:.2f} s | {arms['max_loss_diff']:.1e} |")  # fmt: skip
        if arms["cache_fill_s"]:
            print(f"| {stage} | (cache filled before step 1 in {arms['cache_fill_s']:.2f} s) | | | | | |")


def main(argv: list[str] | None = None) -> dict:
    """Launch the 2 ranks, print the report, return the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(harness.PRESETS))
    p.add_argument("--stages", nargs="+", default=["stage3", "stage4"], choices=sorted(STAGES))
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm (after one warm-up step)")
    p.add_argument("--accumulation", type=int, default=2, help="micro-batches per rank per step")
    p.add_argument("--samples", type=int, default=2, help="samples per micro-batch")
    p.add_argument("--text", type=int, default=64, help="text tokens per sample")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", help=argparse.SUPPRESS)  # set for the ranks by the launcher
    args = p.parse_args(argv)
    if args.out:
        run_rank(args)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(Path(__file__).resolve()),
               *forwarded, "--out", str(out)]  # fmt: skip
        env = os.environ | {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONPATH": str(REPO),
                            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"the ranks failed:\n{proc.stderr[-6000:]}")
        figures = json.loads(out.read_text())
    report(figures)
    return figures


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
