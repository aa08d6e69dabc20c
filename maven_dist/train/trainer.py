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
from tqdm import tqdm

from maven_dist.config import Config, save_config
from maven_dist.data.embedded import maybe_prepare_embedded
from maven_dist.launch.preemption import REQUEUE_EXIT_CODE, install_preemption_handler, preemption_requested
from maven_dist.parallel.dims import ParallelDims
from maven_dist.parallel.distributed import (
    DistEnv,
    all_reduce_max,
    all_reduce_mean,
    barrier,
    init_distributed,
    print0,
)
from maven_dist.parallel.topology import data_parallel_rank
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
        return {
            k: getattr(self, k)
            for k in ("step", "nonfinite_skipped", "nonfinite_in_row", "resumes", "loader")
        }


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
    dp_rank = data_parallel_rank(env.rank, dims)
    loader = build_stage_loader(cfg, tokenizer, layout, source, dp_rank=dp_rank, dp_size=dims.dp)
    accumulation = dims.accumulation_steps(cfg.stage.global_batch_size, cfg.stage.micro_batch_size)
    total_steps = cfg.stage.max_steps or math.ceil(cfg.stage.epochs * loader.batches_per_epoch / accumulation)
    checkpointer = Checkpointer(
        stage_dir / "checkpoints",
        env,
        cfg.checkpoint.keep_last,
        cfg.fingerprint(),
        cfg.stage.name,
        skeleton=stage_dir / "model_skeleton",
    )
    latest = checkpointer.latest() if cfg.checkpoint.resume else None
    saved = checkpointer.check(latest, force) if latest is not None else None
    reshard = saved is not None and checkpointer.needs_reshard(saved)
    engine = build_engine(
        cfg, dims, env, source, layout, tokenizer, total_steps, accumulation, load_universal=reshard
    )
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
    # The tracker already logs the flattened config, the parallel layout and the versions.
    tracker.start_stage(stage_name=cfg.stage.name, params={"recipe_fingerprint": cfg.fingerprint()})
    if hasattr(engine, "ds_config"):
        tracker.log_dict(engine.ds_config, "deepspeed_config.json")
    manifest = {
        "git_sha": git_sha(),
        "versions": package_versions(),
        "layout": {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp},
    }
    metrics_file = MetricsFile(stage_dir / "metrics.jsonl", enabled=env.is_main)
    status = "FAILED"
    try:
        final_loss = _train_loop(
            cfg, env, dims, engine, loader, checkpointer, tracker, metrics_file, state, total_steps, manifest
        )
        status = "FINISHED"
    except Preempted:
        status = "KILLED"
        raise
    finally:
        tracker.end_stage(status=status)
        tracker.close()

    export_dir = _export(cfg, env, engine, tokenizer)
    return StageResult(state.step, final_loss, export_dir)


def _train_loop(
    cfg,
    env: DistEnv,
    dims: ParallelDims,
    engine,
    loader,
    checkpointer,
    tracker,
    metrics_file,
    state: TrainerState,
    total_steps: int,
    manifest: dict,
) -> float:
    stage = cfg.stage
    meter = perf.StepMeter(engine.module, dp=dims.dp, world_size=env.world_size)
    # Micro-batch engines (local, ZeRO-3) are driven one micro-batch at a time; the pipeline engine
    # takes a whole step's micro-batches at once.
    run_step = _pipeline_step if hasattr(engine, "train_step") else _micro_batch_step
    last_loss = math.nan
    batches = iter(loader)
    bar = tqdm(
        total=total_steps, initial=state.step, desc=stage.name, disable=not env.is_main, dynamic_ncols=True
    )

    def save() -> None:
        state.loader = loader.state_dict()
        checkpointer.save(state.step, engine, state.state_dict(), manifest | {"loader": state.loader})

    try:
        while state.step < total_steps:
            step_metrics = run_step(engine, batches, state, stage, env.device, meter)
            state.step += 1
            bar.update(1)
            last_loss = all_reduce_mean(
                step_metrics.get("loss/lm", step_metrics.get("loss/selector_bce", math.nan))
            )
            if state.step % stage.log_every == 0 or state.step == total_steps:
                logged = (
                    step_metrics
                    | meter.flush()
                    | {
                        "loss/total": last_loss,
                        "optim/grad_norm": engine.grad_norm,
                        "data/skipped_samples": float(getattr(loader, "num_skipped", 0)),
                        "data/nonfinite_skipped": float(state.nonfinite_skipped),
                    }
                )
                logged |= {f"optim/lr/{name}": lr for name, lr in engine.learning_rates().items()}
                tracker.log_metrics(logged, step=state.step)
                metrics_file.write(state.step, logged)
                bar.set_postfix(loss=f"{last_loss:.4f}")
            preempted = all_reduce_max(float(preemption_requested())) > 0
            if state.step % cfg.checkpoint.every_steps == 0 or state.step == total_steps or preempted:
                save()
            if preempted:
                print0(
                    f"[{stage.name}] preempted: checkpoint at step {state.step} saved, exiting for requeue"
                )
                raise Preempted()
    finally:
        # Close the iterator now: its DataLoader workers ignore SIGTERM (so a preemption signal cannot kill
        # them before the checkpoint), so they must be told to stop, not left to interpreter exit.
        batches.close()
    bar.close()
    return last_loss


def _micro_batch_step(engine, batches, state: TrainerState, stage, device, meter) -> dict[str, float]:
    """Forward/backward micro-batches until the engine applies an update; a micro-batch with a
    non-finite loss (on any rank) is skipped before its backward. Returns the step's mean metrics."""
    window: dict[str, list[float]] = defaultdict(list)
    while True:
        batch = next(batches).to(device)
        out = engine.forward(batch)
        if not _finite_on_all_ranks(out.loss):
            _count_nonfinite(state, stage, batch.sample_ids, "micro-batch skipped")
            continue
        state.nonfinite_in_row = 0
        engine.backward(out.loss)
        meter.add(_num_samples(batch), out.num_input_tokens, batch.num_images)
        for key, value in out.metrics.items():
            window[key].append(float(value))
        if engine.step():
            return {k: sum(v) / len(v) for k, v in window.items()}


def _pipeline_step(engine, batches, state: TrainerState, stage, device, meter) -> dict[str, float]:
    """One pipeline step over `engine.accumulation` micro-batches. DeepSpeed's pipeline schedule cannot
    drop a micro-batch, so a non-finite loss is only counted (the update is already applied)."""
    micro_batches = [next(batches).to(device) for _ in range(engine.accumulation)]
    loss, metrics, _ = engine.train_step(micro_batches)
    for batch in micro_batches:
        meter.add(_num_samples(batch), engine.input_tokens(batch), batch.num_images)
    if math.isfinite(loss):
        state.nonfinite_in_row = 0
    else:
        _count_nonfinite(state, stage, [i for b in micro_batches for i in b.sample_ids], "update applied")
    return metrics


def _count_nonfinite(state: TrainerState, stage, sample_ids: list[str], what: str) -> None:
    state.nonfinite_skipped += 1
    state.nonfinite_in_row += 1
    print0(f"[{stage.name}] non-finite loss at step {state.step + 1} (samples {sample_ids[:4]}); {what}")
    if state.nonfinite_in_row >= stage.max_bad_steps:
        raise NonFiniteLossError(
            f"{state.nonfinite_in_row} consecutive non-finite losses at step {state.step + 1}; last samples "
            f"{sample_ids}. Lower the learning rate, check the data, or resume from an earlier checkpoint."
        )


def _num_samples(batch) -> int:
    return batch.input_ids.shape[0] if batch.input_ids is not None else batch.num_images


def _finite_on_all_ranks(loss: torch.Tensor) -> bool:
    bad = 0.0 if torch.isfinite(loss.detach()).all() else 1.0
    return all_reduce_max(bad) == 0.0


def _export(cfg: Config, env: DistEnv, engine, tokenizer) -> Path | None:
    """The HF-layout model that the next stage's `init_from` names (gathered full weights, rank 0)."""
    state = engine.full_state_dict()
    out = cfg.stage_dir / "export"
    if env.is_main:
        engine.module.save_pretrained(out, tokenizer, state_dict=state)
        print0(f"[{cfg.stage.name}] exported {out}")
    barrier()
    return out
