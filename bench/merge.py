"""Wall time and peak RSS of ``tools/merge_ckpt.py`` against DeepSpeed's ``zero_to_fp32``, in one run.

Both merge the same ZeRO-3 checkpoint saved by 2 CPU ranks (by default a MaVEn with a ~330M-parameter
LLM, trained one step with the tiny recipe; built once into --work-dir and reused) into fp32
safetensors with 5GB shards. Each tool runs in its own subprocess under a small wrapper whose
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is that tool's peak RSS; the rounds alternate which tool goes
first, after one warm-up read of the checkpoint so both read from the page cache. The outputs are
compared tensor by tensor (bitwise).

DeepSpeed's script memory-maps the optimizer files, which works only for torch's zip format; our
trainer's rank files are in torch's legacy format (see docs/merge.md), so both tools read a zip
re-save of the checkpoint, and merge_ckpt is also timed on the original legacy files.

    python bench/merge.py                            # build (first time, minutes) and measure
    python bench/merge.py --checkpoint RUN/stage4/checkpoints/step_00000001 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

try:  # run as a script, bench/ is on sys.path; imported from the repository root (tests), it is not
    import harness
except ModuleNotFoundError:
    from bench import harness

REPO = harness.REPO

# Runs one command and reports its wall time and peak RSS (the kernel's high-water mark of the child).
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
if proc.returncode:
    sys.exit(proc.stderr[-3000:])
print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def env() -> dict[str, str]:
    return os.environ | {
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def build_checkpoint(work: Path, args) -> Path:
    """A 2-rank ZeRO-3 checkpoint of stage 4 (everything but tower and selector trainable), written by
    the trainer's own builders and CheckpointManager right after the engine is built (bench/merge.py
    --build-worker under torchrun). No optimizer step: a CPU step of a 330M model under ZeRO-3 needs
    DeepSpeed's 2 GB reduce buckets per rank, and the merge reads the same files either way."""
    run_dir = work / "run"
    ckpts = run_dir / "stage4" / "checkpoints"
    if not (ckpts / "latest").is_file():
        if not (run_dir / "data" / "conversations").is_dir():
            from maven_dist.config import load_config
            from maven_dist.offline.demo import prepare_demo

            # Stage 1's recipe builds everything a later stage reads: shards with labels and codes, base models.
            prepare_demo(
                load_config("tests/recipes/tiny/stage1.yaml", [f"run_dir={run_dir}", *llm_overrides(args)])
            )
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            "--master_port=29561",
            str(Path(__file__).resolve()),
            "--build-worker",
            str(run_dir),
            *llm_overrides(args),
        ]
        print("building the checkpoint:", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, env=env() | {"OMP_NUM_THREADS": "1"}, check=True)
    return ckpts / (ckpts / "latest").read_text().strip()


def llm_overrides(args) -> list[str]:
    heads = args.hidden_size // 64
    return [
        f"model.llm.hidden_size={args.hidden_size}",
        f"model.llm.num_layers={args.layers}",
        f"model.llm.num_heads={heads}",
        f"model.llm.num_kv_heads={heads}",
        f"model.llm.intermediate_size={args.intermediate_size}",
    ]


def build_worker(run_dir: Path, overrides: list[str]) -> None:
    from maven_dist.config import load_config
    from maven_dist.parallel.dims import ParallelDims
    from maven_dist.parallel.distributed import barrier, init_distributed
    from maven_dist.parallel.engine import NonFiniteGuard
    from maven_dist.train.builders import (
        build_engine,
        build_stage_loader,
        load_stage_tokenizer,
        resolve_model_source,
    )
    from maven_dist.train.checkpoint import CheckpointManager
    from maven_dist.train.trainer import TrainerState

    cfg = load_config(
        "tests/recipes/tiny/stage4.yaml",
        [
            f"run_dir={run_dir}",
            "demo.enabled=false",
            "stage.init_missing=base",
            "stage.micro_batch_size=1",
            "stage.global_batch_size=2",
            *overrides,
        ],
    )
    env = init_distributed()
    dims = ParallelDims.build(cfg.parallel, env.world_size)
    source = resolve_model_source(cfg, env)
    tokenizer, layout = load_stage_tokenizer(cfg, source)
    engine = build_engine(cfg, dims, env, source, layout, tokenizer, total_steps=1, accumulation=1)
    skeleton = cfg.stage_dir / "model_skeleton"
    if env.is_main:
        engine.module.save_skeleton(skeleton, tokenizer)
    loader = build_stage_loader(cfg, tokenizer, layout, source, env.rank, dims.dp)
    state = TrainerState(NonFiniteGuard(cfg.stage.max_bad_steps, cfg.stage.name))
    layout_extra = {"layout": {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp}}
    checkpoints = CheckpointManager(cfg, env, engine, loader, state, skeleton, manifest_extra=layout_extra)
    checkpoints.maybe_save(0, force=True)
    barrier()


def zip_copy(checkpoint: Path, work: Path) -> Path:
    """The checkpoint with its DeepSpeed rank files re-saved in torch's zip format, once."""
    dest = work / "zip" / checkpoint.parent.parent.name / "checkpoints" / checkpoint.name
    if (dest / "manifest.json").is_file():
        return dest
    import torch

    from maven_dist.parallel.deepspeed_common import DEEPSPEED_SAFE_GLOBALS

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(checkpoint, dest, ignore=shutil.ignore_patterns("*_states.pt", "manifest.json"))
    for f in sorted((checkpoint / "engine" / "zero").glob("*_states.pt")):
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            state = torch.load(f, map_location="cpu", weights_only=True)
        torch.save(state, dest / "engine" / "zero" / f.name, _use_new_zipfile_serialization=True)
        del state
    resolved = checkpoint.parent.parent / "resolved_recipe.yaml"
    if resolved.is_file():
        shutil.copy(resolved, dest.parent.parent / resolved.name)
    shutil.copy(checkpoint / "manifest.json", dest / "manifest.json")  # last: marks the copy complete
    return dest


def measure(cmd: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cmd], cwd=REPO, env=env(), capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def warm(path: Path) -> None:
    for f in path.rglob("*.pt"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def compare(ours: Path, theirs: Path) -> tuple[int, bool]:
    """Our HF-layout output against zero_to_fp32's flat state dict, one tensor at a time."""
    import torch
    from safetensors import safe_open

    from maven_dist.contract.vocab import VocabLayout
    from maven_dist.model import hf_layout

    layout = VocabLayout(**json.loads((ours / "config.json").read_text())["vocab"])
    theirs_files = sorted(theirs.glob("*.safetensors"))
    where = {}
    for f in theirs_files:
        with safe_open(f, "pt") as h:
            where |= {k: f for k in h.keys()}  # noqa: SIM118
    seen, equal = set(), True
    for component, files in (
        (hf_layout.LLM_DIR, sorted((ours / "llm").glob("*.safetensors"))),
        (hf_layout.TOWER_DIR, sorted((ours / "vision_tower").glob("*.safetensors"))),
        (hf_layout.MAVEN_MODULES_FILE, [ours / hf_layout.MAVEN_MODULES_FILE]),
    ):
        for f in files:
            with safe_open(f, "pt") as h:
                for key in h.keys():  # noqa: SIM118
                    for name, tensor in hf_layout.from_hf_layout(
                        component, key, h.get_tensor(key), layout
                    ).items():
                        with safe_open(where[name], "pt") as t:
                            equal &= bool(torch.equal(tensor, t.get_tensor(name)))
                        seen.add(name)
    return len(seen), equal and seen == set(where)


def main(argv: list[str] | None = None) -> dict:
    """Run the bench; returns its figures (also written to WORK_DIR/results.json)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench_merge")
    p.add_argument("--checkpoint", type=Path, help="an existing 2-rank ZeRO-3 checkpoint (skips the build)")
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--intermediate-size", type=int, default=2816)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--min-params", type=float, default=300e6, help="refuse smaller models (0 for a smoke run)"
    )
    args = p.parse_args(argv)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or build_checkpoint(work, args)

    from maven_dist.merge.output_files import expected_shapes

    num_params = sum(math.prod(s) for s in expected_shapes(checkpoint / "model").values())
    if num_params < args.min_params:
        raise SystemExit(
            f"{checkpoint} has {num_params / 1e6:.0f}M parameters, fewer than --min-params {args.min_params:.0f}"
        )
    zipped = zip_copy(checkpoint, work)
    warm(checkpoint)
    warm(zipped)
    ours_out, theirs_out = work / "out_merge_ckpt", work / "out_zero_to_fp32"
    commands = {
        "merge_ckpt": [
            sys.executable,
            "tools/merge_ckpt.py",
            str(zipped),
            str(ours_out),
            "--force",
            "--no-progress",
        ],
        "zero_to_fp32": [
            sys.executable,
            "-m",
            "deepspeed.utils.zero_to_fp32",
            str(zipped / "engine"),
            str(theirs_out),
            "--safe_serialization",
            "--tag",
            "zero",
        ],
    }
    results: dict[str, list[dict]] = {name: [] for name in commands}
    for r in range(args.rounds):
        for name in list(commands) if r % 2 else list(reversed(commands)):
            shutil.rmtree(theirs_out if name == "zero_to_fp32" else ours_out, ignore_errors=True)
            results[name].append(measure(commands[name]))
            print(
                f"round {r + 1} {name:13s} {results[name][-1]['wall_s']:7.2f} s  {results[name][-1]['peak_rss_mb']:8.0f} MB",
                flush=True,
            )
    legacy = measure(
        [
            sys.executable,
            "tools/merge_ckpt.py",
            str(checkpoint),
            str(work / "out_legacy"),
            "--force",
            "--no-progress",
        ]
    )
    tensors, equal = compare(ours_out, theirs_out)

    med = {
        name: {k: statistics.median(x[k] for x in runs) for k in ("wall_s", "peak_rss_mb")}
        for name, runs in results.items()
    }
    summary = {
        "hardware": harness.hardware(),
        "checkpoint": str(checkpoint),
        "parameters": num_params,
        "fp32_bytes": num_params * 4,
        "rounds": args.rounds,
        "median": med,
        "ratio_time": med["merge_ckpt"]["wall_s"] / med["zero_to_fp32"]["wall_s"],
        "ratio_peak_rss": med["merge_ckpt"]["peak_rss_mb"] / med["zero_to_fp32"]["peak_rss_mb"],
        "merge_ckpt_on_legacy_files": legacy,
        "tensors_compared": tensors,
        "bitwise_equal": equal,
        "runs": results,
    }
    print(f"\nhardware: {summary['hardware']}")
    print(
        f"checkpoint: {checkpoint} ({num_params / 1e6:.0f}M parameters, {num_params * 4 / 1e9:.2f} GB fp32, 2 ZeRO-3 ranks)"
    )
    print(f"{'tool':14s} {'wall s':>8s} {'peak RSS MB':>12s}   (median of {args.rounds})")
    for name, m in med.items():
        print(f"{name:14s} {m['wall_s']:8.2f} {m['peak_rss_mb']:12.0f}")
    print(
        f"merge_ckpt/zero_to_fp32: time {summary['ratio_time']:.2f}x (target <= 1.0), peak RSS {summary['ratio_peak_rss']:.2f}x (target <= 0.5)"
    )
    print(
        f"merge_ckpt on the legacy-format originals: {legacy['wall_s']:.2f} s, {legacy['peak_rss_mb']:.0f} MB"
    )
    print(f"outputs bitwise equal over {tensors} tensors: {equal}")
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build-worker"]:
        sys.path.insert(0, str(REPO))
        build_worker(Path(sys.argv[2]), sys.argv[3:])
    else:
        main()
