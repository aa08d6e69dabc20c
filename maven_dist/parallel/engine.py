"""The contract between the trainer and the engines that run optimizer steps.

An engine owns the (possibly sharded) model, the optimizer and the learning-rate schedule. Three
implement :class:`Engine`:

* :class:`~maven_dist.parallel.local.LocalEngine` - one process, plain PyTorch: the reference every
  parallel path is tested against;
* :class:`~maven_dist.parallel.zero3.Zero3Engine` - the HF model under DeepSpeed ZeRO-3;
* :class:`~maven_dist.parallel.three_d.ThreeDEngine` - megatron-core TP x DeepSpeed PP x ZeRO-1.

The trainer sees only this contract: ``train_step`` runs one whole optimizer step and reports it as a
:class:`StepResult`; ``save``/``load`` write and restore the engine's state in a checkpoint
directory (resharding, where the saved layout differs, is the engine's decision at load time);
``export_state_dict`` gathers the full weights for the stage export; ``artifacts`` names the files
worth attaching to the tracking run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from maven_dist.config import StageConfig
from maven_dist.contract.batch import Batch
from maven_dist.contract.checkpoint_layout import Manifest
from maven_dist.model.maven import MavenModel, ModelOutput
from maven_dist.parallel.distributed import all_reduce_max, all_reduce_mean, print0
from maven_dist.parallel.h_eos import HEosCache, HEosSource, PerStepHEos, frozen_llm, h_eos_fingerprint


class NonFiniteLossError(RuntimeError):
    """Too many consecutive micro-batches produced a NaN/inf loss."""


class LayoutMismatch(RuntimeError):
    """A checkpoint written by a parallel layout this engine cannot load."""


@dataclass
class StepResult:
    """One optimizer step, as the trainer logs it."""

    loss: float
    """Mean loss over the step's micro-batches and data-parallel replicas (the same on every rank)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Other step metrics (``loss/...``, ``selector/...``, ``model/...``): means over this replica's micro-batches."""
    grad_norm: float = math.nan
    """Global gradient norm before clipping."""
    learning_rates: dict[str, float] = field(default_factory=dict)
    """Learning rate of each parameter group, by group name."""
    samples: int = 0
    """Samples this replica trained on in the step."""
    input_tokens: int = 0
    """Sequence positions the LLM processed for this replica (throughput and MFU)."""
    images: int = 0
    """Images this replica's micro-batches held."""


class NonFiniteGuard:
    """Counts micro-batches whose loss is NaN/inf and stops the run after ``max_in_row`` in a row.

    Engines report every micro-batch to it (``ok`` or ``bad``); its counters are part of the trainer's
    checkpointed state, so a resumed run keeps counting where it stopped."""

    def __init__(self, max_in_row: int, stage: str):
        self.max_in_row, self.stage = max_in_row, stage
        self.skipped = 0
        """Micro-batches with a non-finite loss so far."""
        self.in_row = 0
        """Of those, how many in a row up to now."""

    def ok(self) -> None:
        self.in_row = 0

    def bad(self, step: int, sample_ids: list[str], what: str) -> None:
        """Record a non-finite micro-batch of optimizer step `step` (1-based); raise after too many."""
        self.skipped += 1
        self.in_row += 1
        print0(f"[{self.stage}] non-finite loss at step {step} (samples {sample_ids[:4]}); {what}")
        if self.in_row >= self.max_in_row:
            raise NonFiniteLossError(
                f"{self.in_row} consecutive non-finite losses at step {step}; last samples {sample_ids}. "
                "Lower the learning rate, check the data, or resume from an earlier checkpoint."
            )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_row": self.in_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.in_row = state["skipped"], state["in_row"]


class Engine(Protocol):
    """What the trainer drives (see the module doc)."""

    module: MavenModel
    """The model: whole (local), partitioned (ZeRO-3) or a skeleton on the meta device (3D). Its configs,
    layout and spec are always there: ``save_skeleton`` and parameter counts use them."""
    accumulation: int
    """Micro-batches of this replica per optimizer step."""
    device: torch.device
    """Where this rank computes: its batches, and every tensor it hands to a collective, live there."""

    def train_step(self, batches: Iterator[Batch], guard: NonFiniteGuard, step: int) -> StepResult:
        """Run optimizer step `step` (1-based) on micro-batches drawn from `batches`."""
        ...

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Validation losses over `batches` (this rank's share; every rank calls it with as many):
        ``val/loss`` (and ``val/loss_text``, ``val/loss_visual_codes`` where the engine has them), each the
        mean over micro-batches and ranks, as the training loss is. No gradient, no state changes."""
        ...

    def save(self, directory: Path) -> None:
        """Write the model, optimizer and schedule state into `directory` (every rank calls it)."""
        ...

    def load(self, directory: Path, saved: Manifest) -> None:
        """Restore what :meth:`save` wrote; `saved` says which layout wrote it (every rank calls it)."""
        ...

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full, unsharded weights under MavenModel's names on rank 0 (None elsewhere); collective."""
        ...

    def artifacts(self) -> dict[str, dict]:
        """Files (name -> mapping) worth attaching to the stage's tracking run, e.g. the DeepSpeed config."""
        ...

    def prepare_h_eos(self, image_codes: Callable[[], np.ndarray], cache_dir: Path) -> None:
        """Before the first step: h_eos of every image this rank will see (`image_codes()`: [n, K] code rows),
        where the stage keeps it fixed (``maven_dist/parallel/h_eos.py``); nothing elsewhere. Collective."""
        ...


class MicroBatchEngine:
    """The step loop of engines that run one micro-batch at a time (local and ZeRO-3).

    A micro-batch whose loss is not finite on some rank is dropped on every rank before its backward
    and the next one is drawn in its place, so the step still averages ``accumulation`` good
    micro-batches. Subclasses provide the forward, the per-micro-batch backward and the update.
    """

    module: MavenModel
    accumulation: int
    device: torch.device
    cfg: StageConfig
    h_eos: HEosSource | None = None
    """Where the forward's h_eos comes from; None where no selector runs (the model needs none)."""

    def _forward(self, batch: Batch, h_eos: torch.Tensor | None = None) -> ModelOutput:
        raise NotImplementedError

    def _eos_pass(self, image_codes: torch.Tensor) -> torch.Tensor:
        """One gradient-free h_eos pass over `image_codes` (every rank together)."""
        raise NotImplementedError

    def _init_h_eos(self) -> None:
        """The h_eos source of the stage (call once the model is built): a frozen LLM's cache, or one pass
        per step; none where no selector runs."""
        runs_selector = self.cfg.loss == "selector_bce" or self.module.selects_patches(self.cfg.views)
        if not runs_selector:
            self.h_eos = None
        elif frozen_llm(self.cfg.trainable):
            width = self.module.llm.config.hidden_size
            self.h_eos = HEosCache(self._eos_pass, self.device, width, self.module.projector_dtype)
        else:
            self.h_eos = PerStepHEos(self._eos_pass, self.device)

    def prepare_h_eos(self, image_codes: Callable[[], np.ndarray], cache_dir: Path) -> None:
        if not isinstance(self.h_eos, HEosCache):
            return
        spec, layout = self.module.spec, self.module.layout
        fingerprint = h_eos_fingerprint(self.module, [spec, layout], self.device)
        self.h_eos.directory = cache_dir / fingerprint
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.h_eos.fill(image_codes(), rank, world)
        print0(
            f"[{self.cfg.name}] h_eos of {len(self.h_eos)} images ready ({self.h_eos.passes} passes; {cache_dir})"
        )

    def _step_h_eos(self, batches: list[Batch]) -> list[torch.Tensor | None]:
        return [None] * len(batches) if self.h_eos is None else self.h_eos.for_step(batches)

    def _backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def _update(self) -> float:
        """Apply the accumulated gradients (clip, step, schedule); return the gradient norm."""
        raise NotImplementedError

    def learning_rates(self) -> dict[str, float]:
        raise NotImplementedError

    def train_step(self, batches: Iterator[Batch], guard: NonFiniteGuard, step: int) -> StepResult:
        window: dict[str, list[float]] = defaultdict(list)
        losses: list[float] = []
        result = StepResult(loss=math.nan)
        # The step's micro-batches first: their h_eos comes from one pass (or the cache) before any forward.
        pending = [next(batches) for _ in range(self.accumulation)]
        h_eos = self._step_h_eos(pending)
        while len(losses) < self.accumulation:
            if not pending:  # a micro-batch was dropped: its replacement brings its own h_eos
                pending = [next(batches)]
                h_eos = self._step_h_eos(pending)
            batch = pending.pop(0).to(self.device)
            out = self._forward(batch, h_eos.pop(0))
            if not _finite_on_all_ranks(out.loss):
                guard.bad(step, batch.sample_ids, "micro-batch skipped")
                continue
            guard.ok()
            self._backward(out.loss)
            losses.append(float(out.loss.detach()))
            for key, value in out.metrics.items():
                window[key].append(float(value))
            result.samples += batch.num_samples
            result.input_tokens += out.num_input_tokens
            result.images += batch.num_images
        result.grad_norm = self._update()
        result.loss = all_reduce_mean(sum(losses) / len(losses), self.device)
        result.metrics = {k: sum(v) / len(v) for k, v in window.items()}
        result.learning_rates = self.learning_rates()
        return result

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        sums = torch.zeros(len(VAL_METRICS), dtype=torch.float64, device=self.device)
        counts = torch.zeros_like(sums)
        for batch in batches:
            (h_eos,) = self._step_h_eos([batch])
            out = self._forward(batch.to(self.device), h_eos)
            for k, key in enumerate(VAL_METRICS):
                if key in out.metrics:
                    sums[k] += float(out.metrics[key])
                    counts[k] += 1
        return reduce_val_metrics(sums, counts)


VAL_METRICS = ("loss/lm", "loss/selector_bce", "loss/lm_text", "loss/lm_visual_codes")
"""Training-loss keys validation reports, and their names there: ``val/loss`` is the stage's own loss."""
_VAL_NAMES = ("val/loss", "val/loss", "val/loss_text", "val/loss_visual_codes")


def reduce_val_metrics(sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """Means over every rank's micro-batches of the :data:`VAL_METRICS` (sums and counts per key, on the
    engine's device: they are all-reduced)."""
    if dist.is_initialized():
        both = torch.cat([sums, counts])
        dist.all_reduce(both)
        sums, counts = both[: len(sums)], both[len(sums) :]
    return {name: float(sums[k] / counts[k]) for k, name in enumerate(_VAL_NAMES) if counts[k] > 0}


def _finite_on_all_ranks(loss: torch.Tensor) -> bool:
    bad = 0.0 if torch.isfinite(loss.detach()).all() else 1.0
    return all_reduce_max(bad, loss.device) == 0.0
