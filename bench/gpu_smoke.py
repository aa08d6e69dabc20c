"""``make gpu-smoke``: the first contact with one GPU, in under 8 minutes, before a cluster run does it.

On one CUDA device, at Vicuna-7B and CLIP ViT-L/14-336 layer shapes with 2 LLM layers (random weights, the
demo's synthetic data, its k-means codes; recipes/maven-7b otherwise as it is), every command a user runs on
the first day, each checked by its exit status:

1. ``maven prepare-demo``: random base models of those shapes, shards, codes;
2. stage 2 then stage 4 under ZeRO-3 on one rank (``parallel.single_process=zero3``: NCCL, bf16 with fp32
   masters, flash-attn 2, sequence packing), validation every 3 steps, a checkpoint every 3; stage 4 is
   interrupted by SIGUSR2 after its first checkpoint (it must save and exit 75) and resumed to the end,
   then exported;
3. the 3D backend with tp=1, pp=1 (stage 4 from stage 2's export, 2 steps);
4. ``maven merge`` of stage 4's checkpoint, ``maven chat`` on the merged model (bf16, ``--device auto``),
   ``maven eval --limit 4`` on the export;
5. a profiled stage-4 engine (built as the trainer builds it): peak GPU memory against ``maven plan``'s
   estimate for the same stage, tokens/s and MFU from the trainer's own metrics, and the CUDA stream/device
   synchronisations per step (torch.profiler's ``cuda*Synchronize`` calls and device-to-host copies).

Without a GPU it prints ``skipped: no GPU`` and exits 0 (``make gpu-smoke`` is not part of ``make test``).
``--cpu`` runs the same sequence at tiny size on the CPU (gloo, fp32, sdpa, no packing): the plumbing, not the
GPU paths. Record the printed figures, with the hardware line, in docs/performance.md ("First contact with a
GPU").

    make gpu-smoke                                   # or: python bench/gpu_smoke.py [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

try:  # run as a script, bench/ is on sys.path; imported from the repository root (tests), it is not
    import harness
except ModuleNotFoundError:
    from bench import harness

REPO = harness.REPO
TIME_LIMIT_S = 8 * 60
PROFILED_STEPS = 3

GPU_SETS = [
    # Vicuna-7B layer shapes, 2 layers; CLIP ViT-L/14-336 (the recipe's); random weights, built by the demo.
    "model.llm.init=random", "model.llm.num_layers=2", "model.llm.path={run_dir}/base/llm",
    "model.vision.init=random", "model.vision.path={run_dir}/base/vision_tower",
    "model.discrete.tokenizer=kmeans", "model.discrete.path={run_dir}/base/kmeans_tokenizer",
    "model.discrete.eva_path=", "model.llm.attn_implementation=flash_attention_2",
    "demo.enabled=true", "demo.num_images=96", "demo.heldout_images=24", "demo.benchmark_questions=8",
    "stage.dtype=bf16", "parallel.single_process=zero3", "tracking.enabled=false", "eval.enabled=false",
]  # fmt: skip
CPU_SETS = ["tracking.enabled=false", "eval.enabled=false", "parallel.single_process=zero3"]
STAGE_SETS = [
    "stage.max_steps=6", "stage.eval_every=3", "checkpoint.every_steps=3", "stage.micro_batch_size=4",
    "stage.global_batch_size=8", "data.val_fraction=0.1", "stage.log_every=1",
]  # fmt: skip


class Smoke:
    """The sequence of commands, each timed and checked; a failure stops the smoke with its output."""

    def __init__(self, work: Path, cpu: bool):
        self.work, self.cpu = work, cpu
        self.run_dir = work / "run"
        self.recipes = REPO / ("tests/recipes/tiny" if cpu else "recipes/maven-7b")
        self.sets = [f"run_dir={self.run_dir}", *(CPU_SETS if cpu else GPU_SETS)]
        self.sets = [s.replace("{run_dir}", str(self.run_dir)) for s in self.sets]
        self.timings: dict[str, float] = {}
        self.start = time.monotonic()

    def env(self) -> dict[str, str]:
        """One process as a world of one: the variables torchrun would set (a plain process receives the
        smoke's SIGUSR2 itself; torchrun's agent would have to forward it)."""
        env = os.environ | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                            "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        return env | ({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"} if self.cpu else {})

    def run(self, name: str, cmd: list[str], expect: int = 0, timeout: float | None = None) -> str:
        started = time.monotonic()
        print(f"[gpu-smoke] {name}: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=timeout)
        self.timings[name] = time.monotonic() - started
        if proc.returncode != expect:
            raise SystemExit(
                f"[gpu-smoke] {name} exited {proc.returncode} (expected {expect}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            )
        return proc.stdout + proc.stderr

    def train(self, stage: str, extra: list[str] = ()) -> list[str]:
        sets = [*self.sets, *STAGE_SETS, *extra]
        if self.cpu:
            sets = [
                s for s in sets if not s.startswith(("stage.micro_batch_size", "stage.global_batch_size"))
            ]
        return [sys.executable, "-m", "maven_dist.train", str(self.recipes / f"{stage}.yaml"),
                *(f"--set={s}" for s in sets)]  # fmt: skip

    def maven(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "maven_dist.cli", *args]

    # ------------------------------------------------------------------ the steps

    def prepare(self) -> None:
        self.run("prepare-demo", self.maven("prepare-demo", str(self.recipes / "stage4.yaml"),
                                            *(f"--set={s}" for s in self.sets)))  # fmt: skip

    def stage2(self) -> None:
        self.run("stage 2 (ZeRO-3, 1 rank)", self.train("stage2"))

    def stage4_interrupted_and_resumed(self) -> None:
        """Stage 4 from stage 2's export: SIGUSR2 after the first checkpoint (save, exit 75), then resumed."""
        cmd = self.train("stage4", ["stage.init_from=stage2"])
        latest = self.run_dir / "stage4" / "checkpoints" / "latest"
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip
        while not latest.exists() and proc.poll() is None:
            time.sleep(0.5)
        if proc.poll() is None:
            proc.send_signal(signal.SIGUSR2)
        out, _ = proc.communicate(timeout=600)
        self.timings["stage 4 until preempted"] = time.monotonic() - started
        if proc.returncode != 75:
            raise SystemExit(
                f"[gpu-smoke] stage 4 did not save and exit 75 on SIGUSR2 ({proc.returncode}):\n{out[-6000:]}"
            )
        resumed = self.run("stage 4 resumed", cmd)
        if "resumed from" not in resumed:
            raise SystemExit(f"[gpu-smoke] stage 4 did not resume from its checkpoint:\n{resumed[-3000:]}")

    def three_d(self) -> None:
        sets = ["parallel.backend=3d", "parallel.tp=1", "parallel.pp=1", "data.packing=false",
                "model.llm.attn_implementation=sdpa", "stage.max_steps=2",
                *self.main_run_inputs(self.work / "run_3d")]  # fmt: skip
        self.run("3D tp=1 pp=1", self.train("stage4", sets))

    def main_run_inputs(self, run_dir: Path) -> list[str]:
        """Overrides for a stage-4 run in its own `run_dir` (another layout's checkpoints) on the main run's
        base models, shards and stage-2 export."""
        run = self.run_dir
        return [f"run_dir={run_dir}", "demo.enabled=false", f"stage.init_from={run / 'stage2' / 'export'}",
                f"data.path={run / 'data' / 'conversations'}", f"model.llm.path={run / 'base' / 'llm'}",
                f"model.vision.path={run / 'base' / 'vision_tower'}",
                f"model.discrete.path={run / 'base' / 'kmeans_tokenizer'}"]  # fmt: skip

    def merge_chat_eval(self) -> None:
        merged = self.work / "merged"
        self.run("maven merge", self.maven("merge", str(self.run_dir), str(merged), "--stage", "stage4",
                                           "--force", "--no-progress"))  # fmt: skip
        image = next((self.run_dir / "data" / "synthetic").rglob("*.png"))
        dtype = "fp32" if self.cpu else "bf16"
        self.run("maven chat", self.maven("chat", str(merged), "What is in the image?", "--image", str(image),
                                          "--max-new-tokens", "8", "--dtype", dtype, "--device", "auto",
                                          "--no-stream"))  # fmt: skip
        bench = self.run_dir / "data" / "benchmarks"
        data = ["--data", str(bench)] if bench.is_dir() else []
        # one generative task and one multiple-choice task: both scoring paths
        self.run("maven eval --limit 4", self.maven("eval", str(self.run_dir / "stage4" / "export"), *data,
                                                    "--tasks", "vqav2,mmbench", "--limit", "4", "--dtype", dtype,
                                                    "--no-tracking", "--out", str(self.work / "eval")))  # fmt: skip

    def profile(self) -> dict:
        out = self.work / "profile.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--profile-into", str(out), "--work-dir",
               str(self.work), *(["--cpu"] if self.cpu else [])]  # fmt: skip
        self.run("profiled stage-4 steps", cmd)
        return json.loads(out.read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- the profiled step (its own process)


def profile_stage4(smoke: Smoke, out: Path) -> None:
    """Stage 4's engine built as the trainer builds it, one warm-up step and PROFILED_STEPS under the profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from maven_dist.config import load_config
    from maven_dist.parallel.dims import ParallelDims
    from maven_dist.parallel.distributed import init_distributed
    from maven_dist.parallel.engine import NonFiniteGuard
    from maven_dist.parallel.memory_plan import estimate_zero3
    from maven_dist.train import builders
    from maven_dist.train.metrics_file import read_metrics

    sets = [*smoke.sets, *STAGE_SETS, *smoke.main_run_inputs(smoke.work / "run_profile")]
    if smoke.cpu:
        sets = [s for s in sets if not s.startswith(("stage.micro_batch_size", "stage.global_batch_size"))]
    cfg = load_config(smoke.recipes / "stage4.yaml", sets)
    env = init_distributed()
    dims = ParallelDims.build(cfg.parallel, env.world_size)
    source = builders.resolve_model_source(cfg, env)
    tokenizer, layout = builders.load_stage_tokenizer(cfg, source)
    loader = builders.build_stage_loader(cfg, tokenizer, layout, source, 0, 1)
    accumulation = dims.accumulation_steps(cfg.stage.global_batch_size, cfg.stage.micro_batch_size)
    engine = builders.build_engine(
        cfg, dims, env, source, layout, tokenizer, PROFILED_STEPS + 1, accumulation
    )
    batches, guard = iter(loader), NonFiniteGuard(1, "smoke")
    engine.train_step(batches, guard, 1)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for step in range(PROFILED_STEPS):
            engine.train_step(batches, guard, step + 2)
        if cuda:
            torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    syncs = sum("Synchronize" in n for n in names)
    dtoh = sum(("DtoH" in n or "Device -> Host" in n) for n in names)
    plan = estimate_zero3(cfg, layout, world=1)
    metrics = read_metrics(smoke.run_dir / "stage4" / "metrics.jsonl")
    perf = [m for m in metrics if "perf/tokens_per_s" in m]
    figures = {
        "hardware": harness.hardware("cuda" if cuda else None),
        "syncs_per_step": syncs / PROFILED_STEPS,
        "device_to_host_copies_per_step": dtoh / PROFILED_STEPS,
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "plan_gb": plan.total / 2**30,
        "plan_without_runtime_gb": (plan.total - 1.5 * 2**30) / 2**30,
        "tokens_per_s": perf[-1]["perf/tokens_per_s"] if perf else None,
        "mfu": perf[-1].get("perf/mfu") if perf else None,
    }
    out.write_text(json.dumps(figures, indent=1))


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "gpu_smoke")
    p.add_argument("--cpu", action="store_true", help="the sequence at tiny size on the CPU (plumbing only)")
    p.add_argument("--profile-into", type=Path, help=argparse.SUPPRESS)  # the profiled step's own process
    args = p.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("skipped: no GPU")
        return {"skipped": "no GPU"}
    smoke = Smoke(args.work_dir, args.cpu)
    if args.profile_into:
        profile_stage4(smoke, args.profile_into)
        return {}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    smoke.prepare()
    smoke.stage2()
    smoke.stage4_interrupted_and_resumed()
    smoke.three_d()
    smoke.merge_chat_eval()
    figures = smoke.profile() | {"seconds": smoke.timings, "total_s": time.monotonic() - smoke.start}
    report(figures)
    (args.work_dir / "figures.json").write_text(json.dumps(figures, indent=1))
    if figures["total_s"] > TIME_LIMIT_S and not args.cpu:
        raise SystemExit(f"[gpu-smoke] took {figures['total_s']:.0f} s, over its {TIME_LIMIT_S} s budget")
    return figures


def report(figures: dict) -> None:
    print(f"# gpu-smoke on {figures['hardware']}")
    for name, seconds in figures["seconds"].items():
        print(f"  {name:32s} {seconds:7.1f} s")
    peak = figures["peak_gb"]
    print(f"  peak memory {peak:.2f} GiB against the plan's {figures['plan_gb']:.2f} GiB" if peak is not None
          else f"  plan {figures['plan_gb']:.2f} GiB (no device memory on a CPU)")  # fmt: skip
    print(f"  tokens/s {figures['tokens_per_s']}, MFU {figures['mfu']}")
    print(f"  per step: {figures['syncs_per_step']:.1f} stream/device synchronisations, "
          f"{figures['device_to_host_copies_per_step']:.1f} device-to-host copies")  # fmt: skip
    print(f"  total {figures['total_s']:.0f} s")


if __name__ == "__main__":
    main()
