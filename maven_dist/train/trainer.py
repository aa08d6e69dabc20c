"""Run one stage of the recipe: builders construct, the trainer orchestrates.

    recipe -> Config -> (tokenizer, model source, loader, engine, checkpoints, tracker) -> loop -> export

The stage's config says what trains, which views and which loss (stages are data); the same loop
runs every stage on every backend, through the engine contract (``maven_dist/parallel/engine.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from maven_dist.config import Config, save_config
from maven_dist.contract.checkpoint_layout import write_finished
from maven_dist.contract.preemption import (
    REQUEUE_EXIT_CODE,
    install_preemption_handler,
    mark_requeue_requested,
    preemption_requested,
)
from maven_dist.parallel.dims import ParallelDims
from maven_dist.parallel.distributed import DistEnv, all_reduce_max, barrier, init_distributed, print0
from maven_dist.parallel.engine import Engine, NonFiniteGuard, NonFiniteLossError
from maven_dist.parallel.mixed_precision import maybe_enable_tf32
from maven_dist.train import perf
from maven_dist.train.builders import (
    build_engine,
    build_stage_loader,
    discrete_tokenizer_files,
    load_stage_tokenizer,
    resolve_model_source,
    stage_template,
)
from maven_dist.train.checkpoint import CheckpointManager
from maven_dist.train.progress import Progress
from maven_dist.train.provenance import git_sha, package_versions
from maven_dist.train.tracking import Tracker, build_tracker
from maven_dist.train.validation import blindness_warning, validate

__all__ = ["NonFiniteLossError", "Preempted", "StageResult", "TrainerState", "run_stage"]


class Preempted(SystemExit):
    """Raised after a preemption checkpoint; exits with the requeue code the launchers expect."""

    def __init__(self) -> None:
        super().__init__(REQUEUE_EXIT_CODE)


class TrainerState:
    """The trainer's own counters: checkpointed with everything else."""

    def __init__(self, guard: NonFiniteGuard):
        self.step = 0
        """Optimizer steps done."""
        self.resumes = 0
        """How many times this stage was resumed from a checkpoint."""
        self.guard = guard

    def state_dict(self) -> dict:
        return {"step": self.step, "resumes": self.resumes, "nonfinite": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.resumes = state["step"], state["resumes"] + 1
        self.guard.load_state_dict(state["nonfinite"])


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
    maybe_enable_tf32()
    torch.manual_seed(cfg.seed)
    stage_dir = cfg.stage_dir
    if env.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, stage_dir / "resolved_recipe.yaml")

    source = resolve_model_source(cfg, env)
    tokenizer, layout = load_stage_tokenizer(cfg, source)
    dp_rank = dims.data_parallel_rank(env.rank)
    loader = build_stage_loader(cfg, tokenizer, layout, source, dp_rank, dims.dp)
    val_loader = build_stage_loader(cfg, tokenizer, layout, source, dp_rank, dims.dp, split="val")
    accumulation = dims.accumulation_steps(cfg.stage.global_batch_size, cfg.stage.micro_batch_size)
    total_steps = cfg.stage.max_steps or math.ceil(cfg.stage.epochs * loader.batches_per_epoch / accumulation)
    engine = build_engine(cfg, dims, env, source, layout, tokenizer, total_steps, accumulation)
    skeleton = stage_dir / "model_skeleton"
    inference = {
        "template": stage_template(cfg),
        "views": list(cfg.stage.views),
        "discrete": discrete_tokenizer_files(cfg) if env.is_main else None,
    }
    if env.is_main:
        engine.module.save_skeleton(skeleton, tokenizer, **inference)
    state = TrainerState(NonFiniteGuard(cfg.stage.max_bad_steps, cfg.stage.name))
    manifest_extra = {
        "git_sha": git_sha(),
        "versions": package_versions(),
        "layout": {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp},
    }
    checkpoints = CheckpointManager(
        cfg, env, engine, loader, state, skeleton, allow_recipe_change=force, manifest_extra=manifest_extra
    )
    checkpoints.load_latest()
    _prepare_h_eos(cfg, engine, loader, val_loader, total_steps * accumulation)

    tracker = build_tracker(cfg, rank=env.rank, world_size=env.world_size)
    # The tracker already logs the flattened config, the parallel layout and the versions.
    params = {"recipe_fingerprint": cfg.fingerprint(), "data.too_long_samples": loader.too_long}
    tracker.start_stage(stage_name=cfg.stage.name, params=params)
    for name, data in engine.artifacts().items():
        tracker.log_dict(data, name)
    status = "FAILED"
    try:
        final_loss = _train_loop(
            cfg, env, dims, engine, loader, val_loader, checkpoints, tracker, state, total_steps
        )
        status = "FINISHED"
    except Preempted:
        status = "KILLED"
        raise
    finally:
        tracker.end_stage(status=status)
        tracker.close()

    export_dir = _export(cfg, env, engine, tokenizer, inference)
    if env.is_main:
        write_finished(stage_dir, cfg.fingerprint(), state.step)
    barrier()
    return StageResult(state.step, final_loss, export_dir)


def _train_loop(
    cfg: Config,
    env: DistEnv,
    dims: ParallelDims,
    engine: Engine,
    loader,
    val_loader,
    checkpoints: CheckpointManager,
    tracker: Tracker,
    state: TrainerState,
    total_steps: int,
) -> float:
    stage = cfg.stage
    meter = perf.StepMeter(engine.module, dp=dims.dp, world_size=env.world_size)
    progress = Progress(stage.name, total_steps, state.step, enabled=env.is_main)
    last_loss = math.nan
    batches = iter(loader)
    try:
        while state.step < total_steps:
            result = engine.train_step(batches, state.guard, state.step + 1)
            state.step += 1
            meter.add(result.samples, result.input_tokens, result.images)
            last_loss = result.loss
            progress.update(state.step, last_loss)
            logged = {}
            if state.step % stage.log_every == 0 or state.step == total_steps:
                logged = result.metrics | meter.flush() | _step_metrics(result, loader, state)
            if val_loader is not None and (
                (stage.eval_every and state.step % stage.eval_every == 0) or state.step == total_steps
            ):
                started = time.perf_counter()
                validated = validate(engine.evaluate, val_loader.one_pass, stage.val_image_control)
                meter.exclude(time.perf_counter() - started)  # throughput is of training steps only
                logged |= validated
                warning = blindness_warning(stage.name, validated)
                if warning:
                    print0(warning)
            if logged:
                tracker.log_metrics(logged, step=state.step)  # rank 0: metrics.jsonl, then MLflow
            preempted = all_reduce_max(float(preemption_requested()), engine.device) > 0
            checkpoints.maybe_save(state.step, force=state.step == total_steps or preempted)
            if preempted:
                print0(
                    f"[{stage.name}] preempted: checkpoint at step {state.step} saved, exiting for requeue"
                )
                if env.is_main:  # every rank is past the checkpoint's barriers: it is complete on disk
                    mark_requeue_requested()
                raise Preempted()
    finally:
        # Close the iterator now: its DataLoader workers ignore SIGTERM (so a preemption signal cannot kill
        # them before the checkpoint), so they must be told to stop, not left to interpreter exit.
        batches.close()
        progress.close()
    return last_loss


def _prepare_h_eos(cfg: Config, engine: Engine, loader, val_loader, micro_batches: int) -> None:
    """The engine's h_eos for every image this rank will see, where the stage keeps it fixed (stages 1 and
    3: their LLM is frozen; maven_dist/parallel/h_eos.py): its batches of every epoch the stage reaches,
    and its validation share."""
    epochs = range(math.ceil(micro_batches / loader.batches_per_epoch))

    def image_codes() -> np.ndarray:  # read only where the engine needs them: planning epochs takes seconds
        codes = [loader.image_codes(epochs)] + (
            [val_loader.image_codes([0])] if val_loader is not None else []
        )
        codes = [c for c in codes if c.size]
        return np.concatenate(codes) if codes else np.zeros((0, 0), np.int64)

    engine.prepare_h_eos(image_codes, cfg.stage_dir / "h_eos")


def _step_metrics(result, loader, state: TrainerState) -> dict[str, float]:
    metrics = {
        "loss/total": result.loss,
        "optim/grad_norm": result.grad_norm,
        "data/skipped_samples": float(loader.num_skipped),
        "data/nonfinite_skipped": float(state.guard.skipped),
    }
    return metrics | {f"optim/lr/{name}": lr for name, lr in result.learning_rates.items()}


def _export(cfg: Config, env: DistEnv, engine: Engine, tokenizer, inference: dict) -> Path | None:
    """The HF-layout model that the next stage's `init_from` names (gathered full weights, rank 0), with
    what inference needs (the chat template, the discrete tokenizer)."""
    state = engine.export_state_dict()
    out = cfg.stage_dir / "export"
    if env.is_main:
        engine.module.save_pretrained(out, tokenizer, state_dict=state, **inference)
        print0(f"[{cfg.stage.name}] exported {out}")
    barrier()
    return out
