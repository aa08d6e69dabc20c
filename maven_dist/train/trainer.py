"""Run one stage of the recipe: builders construct, the trainer orchestrates.

    recipe -> Config -> (tokenizer, model source, loader, engine, checkpointer, tracker) -> loop -> export

The stage's config says what trains, which views and which loss (stages are data); the same loop
runs every stage on every backend.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from maven_dist.config import Config, save_config
from maven_dist.data.embedded import maybe_prepare_embedded
from maven_dist.launch.preemption import REQUEUE_EXIT_CODE, install_preemption_handler, preemption_requested
from maven_dist.parallel.dims import ParallelDims
from maven_dist.parallel.distributed import DistEnv, all_reduce_max, barrier, init_distributed, print0
from maven_dist.train import perf
from maven_dist.train.builders import (
    build_engine,
    build_stage_loader,
    load_stage_tokenizer,
    resolve_model_source,
)
from maven_dist.train.checkpoint import Checkpointer
from maven_dist.train.metrics_file import MetricsFile
from maven_dist.train.tracking import build_tracker
from maven_dist.train.tracking.run_info import git_sha, package_versions


class NonFiniteLossError(RuntimeError):
    """Too many consecutive micro-batches produced a NaN/inf loss."""


class Preempted(SystemExit):
    """Raised after a preemption checkpoint; exits with the requeue code the launchers expect."""

    def __init__(self) -> None:
        super().__init__(REQUEUE_EXIT_CODE)


@dataclass
class TrainerState:
    step: int = 0
    """Optimizer steps done."""
    nonfinite_skipped: int = 0
    """Micro-batches skipped for a NaN/inf loss."""
    nonfinite_in_row: int = 0
    """Consecutive such micro-batches (reset by a finite one)."""
    resumes: int = 0
    """How many times this stage was resumed from a checkpoint."""
    loader: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("step", "nonfinite_skipped", "nonfinite_in_row", "resumes", "loader")}


@dataclass
class StageResult:
    steps: int
    final_loss: float
    export_dir: Path | None


def run_stage(cfg: Config, force: bool = False) -> StageResult:
    """Train `cfg.stage` to the end (or to a preemption), checkpointing and exporting."""
    env = init_distributed()
    dims = ParallelDims.build(cfg.parallel, env.world_size)
    install_preemption_handler()
    torch.manual_seed(cfg.seed)
    stage_dir = cfg.stage_dir
    if env.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, stage_dir / "resolved_recipe.yaml")

    maybe_prepare_embedded(cfg, env)
    source = resolve_model_source(cfg, env)
    tokenizer, layout = load_stage_tokenizer(cfg, source)
    dp_rank = env.rank // (dims.tp * dims.pp)
    loader = build_stage_loader(cfg, tokenizer, layout, source, dp_rank=dp_rank, dp_size=dims.dp)
    accumulation = dims.accumulation_steps(cfg.stage.global_batch_size, cfg.stage.micro_batch_size)
    total_steps = cfg.stage.max_steps or math.ceil(cfg.stage.epochs * loader.batches_per_epoch / accumulation)
    checkpointer = Checkpointer(
        stage_dir / "checkpoints", env, cfg.checkpoint.keep_last, cfg.fingerprint(), cfg.stage.name,
        skeleton=stage_dir / "model_skeleton",
    )
    latest = checkpointer.latest() if cfg.checkpoint.resume else None
    saved = checkpointer.check(latest, force) if latest is not None else None
    reshard = saved is not None and checkpointer.needs_reshard(saved)
    engine = build_engine(cfg, dims, env, source, layout, tokenizer, total_steps, accumulation, load_universal=reshard)
    if env.is_main:
        engine.module.save_skeleton(checkpointer.skeleton, tokenizer)
    state = TrainerState()
    if latest is not None:
        restored = checkpointer.load(latest, engine)
        state = TrainerState(**{k: restored[k] for k in TrainerState().state_dict()})
        state.resumes += 1
        loader.load_state_dict(state.loader)
        print0(
            f"[{cfg.stage.name}] resumed from {latest} at step {state.step} (resume #{state.resumes}"
            + (f", resharded from {saved.world_size} to {env.world_size} ranks)" if reshard else ")")
        )

    tracker = build_tracker(cfg, rank=env.rank, world_size=env.world_size)
    layout_params = {"parallel.dp": dims.dp, "parallel.tp": dims.tp, "parallel.pp": dims.pp, "recipe_fingerprint": cfg.fingerprint()}
    tracker.start_stage(stage_name=cfg.stage.name, params=layout_params)
    if hasattr(engine, "ds_config"):
        tracker.log_dict(engine.ds_config, "deepspeed_config.json")
    manifest = {"git_sha": git_sha(), "versions": package_versions(), "layout": {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp}}
    metrics_file = MetricsFile(stage_dir / "metrics.jsonl", enabled=env.is_main)
    status = "FAILED"
    try:
        final_loss = _train_loop(cfg, env, engine, loader, checkpointer, tracker, metrics_file, state, total_steps, manifest)
        status = "FINISHED"
    except Preempted:
        status = "KILLED"
        raise
    finally:
        tracker.end_stage(status=status)
        tracker.close()

    export_dir = _export(cfg, env, engine, tokenizer)
    return StageResult(state.step, final_loss, export_dir)


def _train_loop(cfg, env: DistEnv, engine, loader, checkpointer, tracker, metrics_file, state: TrainerState, total_steps: int, manifest: dict) -> float:
    stage = cfg.stage
    device = env.device
    meter = perf.StepMeter(engine.module, world_size=env.world_size)
    window: dict[str, list[float]] = defaultdict(list)
    last_loss = math.nan
    batches = iter(loader)
    bar = tqdm(total=total_steps, initial=state.step, desc=stage.name, disable=not env.is_main, dynamic_ncols=True)

    def save() -> None:
        state.loader = loader.state_dict()
        checkpointer.save(state.step, engine, state.state_dict(), manifest | {"loader": state.loader})

    try:
        while state.step < total_steps:
            batch = next(batches).to(device)
            out = engine.forward(batch)
            if not _finite_on_all_ranks(out.loss):
                state.nonfinite_skipped += 1
                state.nonfinite_in_row += 1
                print0(f"[{stage.name}] non-finite loss at step {state.step + 1} (samples {batch.sample_ids[:4]}); micro-batch skipped")
                if state.nonfinite_in_row >= stage.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{state.nonfinite_in_row} consecutive non-finite losses at step {state.step + 1}; last samples "
                        f"{batch.sample_ids}. Lower the learning rate, check the data, or resume from an earlier checkpoint."
                    )
                continue
            state.nonfinite_in_row = 0
            engine.backward(out.loss)
            meter.add_micro_batch(out, batch)
            for key, value in out.metrics.items():
                window[key].append(float(value))
            if not engine.step():
                continue
            state.step += 1
            bar.update(1)
            step_metrics = {k: sum(v) / len(v) for k, v in window.items()}
            window.clear()
            last_loss = _mean_over_ranks(step_metrics.get("loss/lm", step_metrics.get("loss/selector_bce", math.nan)))
            if state.step % stage.log_every == 0 or state.step == total_steps:
                logged = step_metrics | meter.flush() | {
                    "loss/total": last_loss,
                    "optim/grad_norm": engine.grad_norm,
                    "data/skipped_samples": float(getattr(loader, "num_skipped", 0)),
                    "data/nonfinite_skipped": float(state.nonfinite_skipped),
                }
                logged |= {f"optim/lr/{name}": lr for name, lr in engine.learning_rates().items()}
                tracker.log_metrics(logged, step=state.step)
                metrics_file.write(state.step, logged)
                bar.set_postfix(loss=f"{last_loss:.4f}")
            preempted = all_reduce_max(float(preemption_requested())) > 0
            if state.step % cfg.checkpoint.every_steps == 0 or state.step == total_steps or preempted:
                save()
            if preempted:
                print0(f"[{stage.name}] preempted: checkpoint at step {state.step} saved, exiting for requeue")
                raise Preempted()
    finally:
        # Close the iterator now: its DataLoader workers ignore SIGTERM (so a preemption signal cannot kill
        # them before the checkpoint), so they must be told to stop, not left to interpreter exit.
        batches.close()
    bar.close()
    return last_loss


def _finite_on_all_ranks(loss: torch.Tensor) -> bool:
    bad = 0.0 if torch.isfinite(loss.detach()).all() else 1.0
    return all_reduce_max(bad) == 0.0


def _mean_over_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _export(cfg: Config, env: DistEnv, engine, tokenizer) -> Path | None:
    """The HF-layout model that the next stage's `init_from` names (gathered full weights, rank 0)."""
    state = engine.full_state_dict()
    out = cfg.stage_dir / "export"
    if env.is_main:
        engine.module.save_pretrained(out, tokenizer, state_dict=state)
        print0(f"[{cfg.stage.name}] exported {out}")
    barrier()
    return out
