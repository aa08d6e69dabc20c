"""3D backend: megatron-core tensor parallel x DeepSpeed pipeline x ZeRO-1 data parallel.

The model is ``maven_dist/parallel/pipeline.py``'s layer list in a DeepSpeed ``PipelineModule``; each
rank builds only its stage's layers and reads only its tp slices of them from the MaVEn directory
(streamed, one full tensor in memory at a time). DeepSpeed's pipeline engine runs a whole optimizer
step at once, so this engine is step-level: :meth:`ThreeDEngine.train_step` takes the step's
micro-batches (this data-parallel replica's, every rank of the replica the same list), runs the
forward-only h_eos pass when the stage uses the continuous view, then DeepSpeed's 1F1B schedule,
gradient all-reduce over dp, clipping and the AdamW step.

Loss semantics equal ``LocalEngine``'s: each micro-batch's loss is the mean CE over its labelled
tokens; DeepSpeed averages over the gas micro-batches and the dp replicas, i.e. the same as one
process accumulating ``loss / (gas * dp)``.

What the trainer calls (docs/parallel_3d.md)::

    engine = ThreeDEngine(source, cfg, dims, total_steps, accumulation, spec_overrides)
    loss, metrics, input_tokens = engine.train_step(micro_batches)   # one optimizer step
    engine.grad_norm; engine.learning_rates(); engine.save_state(d); engine.load_state(d)
    engine.full_state_dict()   # collective; full MavenModel-named weights on rank 0
    engine.module              # MavenModel skeleton on the meta device (save_skeleton / save_pretrained)

The loader's dp rank is ``topology.data_parallel_rank(rank, dims)``: every tp and pp rank of a replica
gets the same micro-batches.

Stage 1 (``loss: selector_bce``) is not run on this backend: it trains a 3-layer MLP on frozen
features and needs no model parallelism; run it on the zero3 backend (the export is the same HF
layout, so stage 2 starts on 3d from it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoConfig, CLIPVisionConfig

from maven_dist.config import Config, ConfigError
from maven_dist.data.batch import Batch
from maven_dist.model import hf_layout
from maven_dist.model.maven import MavenModel, MavenSpec
from maven_dist.model.sequence import visual_tokens_per_image
from maven_dist.model.vocab import VocabLayout
from maven_dist.parallel.checkpoint_engine import WeightsOnlyCheckpointEngine
from maven_dist.parallel.convert import full_name, iter_maven_dir, placement, shard_tensor, unshard_state_dict
from maven_dist.parallel.dims import ParallelDims
from maven_dist.parallel.megatron_llama import LlamaShape, TPDecoderLayer, build_tp_config
from maven_dist.parallel.pipeline import InputStage, OutputStage, pipeline_eos_states
from maven_dist.parallel.topology import (
    build_topology,
    check_topologies_agree,
    maybe_init_model_parallel,
    pipe_ranks,
)
from maven_dist.train.parts import build_param_groups, part_of
from maven_dist.train.schedule import lr_multiplier

CHECKPOINT_TAG = "3d"


def build_ds_config(cfg: Config, dims: ParallelDims, accumulation: int, zero_stage: int = 1) -> dict:
    stage = cfg.stage
    bf16 = stage.dtype == "bf16" and torch.cuda.is_available()  # CPU runs are always fp32
    return {
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": stage.micro_batch_size * accumulation * dims.dp,
        # Without ZeRO, DeepSpeed's own clipping fails on a stage with nothing to train: the optimizer clips.
        "gradient_clipping": stage.optimizer.grad_clip if zero_stage else 0.0,
        "bf16": {"enabled": bf16},
        # DeepSpeed refuses ZeRO >= 2 with pipeline parallelism; ZeRO-1 shards Adam state over dp.
        # Stage 0 only where a pipeline stage trains nothing (`_equalise_group_count`).
        "zero_optimization": {"stage": zero_stage},
        # Whole activations between stages (no slicing over tp): the tuple carries int tensors.
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class _Source:
    """Configs and a tensor stream of the starting weights, from a MaVEn directory or a built model."""

    def __init__(self, source: Path | Callable[[], MavenModel], spec_overrides: dict | None):
        if callable(source):
            model = source()
            self.llm_config, self.tower_config = model.llm.config, model.vision_tower.tower.config
            self.layout, self.spec = model.layout, model.spec
            self.processor = model.image_processor_config
            self._state = model.state_dict()
            self.directory = None
        else:
            self.directory = Path(source)
            saved = hf_layout.read_maven_config(self.directory)
            self.llm_config = AutoConfig.from_pretrained(self.directory / hf_layout.LLM_DIR)
            self.tower_config = CLIPVisionConfig.from_pretrained(self.directory / hf_layout.TOWER_DIR)
            self.layout = VocabLayout(**saved["vocab"])
            self.spec = MavenSpec(**(saved["spec"] | (spec_overrides or {})))
            processor = self.directory / hf_layout.TOWER_DIR / "preprocessor_config.json"
            self.processor = json.loads(processor.read_text()) if processor.is_file() else None
            self._state = None

    def tensors(self):
        if self._state is not None:
            yield from self._state.items()
        else:
            yield from iter_maven_dir(self.directory)

    def skeleton(self) -> MavenModel:
        """A MavenModel on the meta device: configs, layout and spec for the trainer (save_skeleton,
        save_pretrained with gathered weights, parameter counts), no memory."""
        with torch.device("meta"):
            model = MavenModel.from_configs(
                self.llm_config, self.tower_config, self.layout, self.spec, init_weights=False
            )
        model.image_processor_config = self.processor
        return model


class ThreeDEngine:
    """Step-level engine for ``parallel.backend: 3d`` (see the module doc for what the trainer calls)."""

    def __init__(
        self,
        source: Path | Callable[[], MavenModel],
        cfg: Config,
        dims: ParallelDims,
        total_steps: int,
        accumulation: int,
        spec_overrides: dict | None = None,
    ):
        if cfg.stage.loss != "lm":
            raise ConfigError(
                f"stage {cfg.stage.name}: loss={cfg.stage.loss!r} does not run on parallel.backend=3d (the selector "
                "stage needs no model parallelism); run it with parallel.backend=zero3"
            )
        self.cfg = cfg.stage
        self.dims = dims
        self.accumulation = accumulation
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        maybe_init_model_parallel(dims)
        self.topology = build_topology(dims)
        check_topologies_agree(self.topology)
        coord = self.topology.get_coord(dist.get_rank())
        self.tp_rank, self.stage, self.dp_rank = coord.model, coord.pipe, coord.data
        self.pipe_ranks = pipe_ranks(self.topology)

        src = _Source(source, spec_overrides)
        self.module = src.skeleton()
        self.layout, self.spec = src.layout, src.spec
        self.shape = LlamaShape.from_hf(src.llm_config)
        self.num_layers = self.shape.num_layers
        self.views = tuple(cfg.stage.views)
        tp_config = build_tp_config(dims)
        specs = [
            LayerSpec(InputStage, self.shape, self.layout, self.spec, src.tower_config, self.views, tp_config)
        ]
        checkpointing = cfg.stage.gradient_checkpointing
        specs += [
            LayerSpec(TPDecoderLayer, self.shape, tp_config, checkpointing) for _ in range(self.num_layers)
        ]
        specs += [LayerSpec(OutputStage, self.shape, self.layout, tp_config)]
        self.pipe = PipelineModule(
            layers=specs,
            topology=self.topology,
            loss_fn=None,
            partition_method="type:TPDecoderLayer",
            dynamic_shape=True,
        )
        self.local_layers = {int(name): layer for name, layer in self.pipe.named_children() if name.isdigit()}
        self._load(src)
        self._apply_trainable(cfg.stage.trainable)
        optimizer, scheduler = self._build_optimizer(total_steps)
        self.ds_config = build_ds_config(cfg, dims, accumulation, self.zero_stage)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.pipe, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.engine.checkpoint_engine = WeightsOnlyCheckpointEngine()
        self._torch_optimizer = optimizer
        self._grad_norm = math.nan

    # ------------------------------------------------------------------ construction

    def _named_full(self):
        """(MavenModel name, local parameter) for this rank's parameters."""
        for key, param in self.pipe.named_parameters():
            layer, local = key.split(".", 1)
            yield full_name(int(layer), local, self.num_layers), param

    def _load(self, src: _Source) -> None:
        params = dict(self.pipe.named_parameters())
        buffers = dict(self.pipe.named_buffers())
        loaded = set()
        for name, tensor in src.tensors():
            place = placement(name, self.num_layers)
            key = f"{place.layer}.{place.local}"
            if place.layer not in self.local_layers:
                continue
            if key in buffers:  # e.g. CLIP position_ids: rebuilt by the module, not loaded
                continue
            if key not in params:
                raise ValueError(f"{name} -> {key}: not a parameter of the 3D model")
            value = shard_tensor(tensor, place.split_dim, self.tp_rank, self.dims.tp)
            if params[key].shape != value.shape:
                raise ValueError(
                    f"{name}: shard {tuple(value.shape)} vs parameter {tuple(params[key].shape)}"
                )
            with torch.no_grad():
                params[key].copy_(value)
            loaded.add(key)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(
                f"the starting weights lack {len(missing)} parameters of this stage, e.g. {missing[:5]}"
            )
        self._mark_parallel_attributes()

    def _mark_parallel_attributes(self) -> None:
        """Tell DeepSpeed's grad-norm which parameters are tp shards, so each element counts once.

        megatron-core sets ``tensor_model_parallel`` only when it initialises weights itself (we load
        them), so we set it from our own placement table. DeepSpeed counts a parameter if it is a tp
        shard or the rank is "model-parallel rank 0"; ZeRO-1 means the tp rank by that, the plain
        path the rank in the whole pp x tp grid, which would drop the replicated parameters (norms,
        projector) of every later pipeline stage: ``model_parallel`` on tp rank 0 counts them once.
        """
        for name, param in self._named_full():
            split = placement(name, self.num_layers).split_dim
            if split is not None and self.dims.tp > 1:
                set_tensor_model_parallel_attributes(param, is_parallel=True, dim=split, stride=1)
            elif self.tp_rank == 0:
                param.model_parallel = True

    def _apply_trainable(self, parts: Sequence[str]) -> None:
        for name, param in self._named_full():
            param.requires_grad_(part_of(name) in parts)

    def _build_optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, Callable[..., LambdaLR]]:
        opt = self.cfg.optimizer
        named = _NamedParams(list(self._named_full()))
        trains = any(p.requires_grad for _, p in named.named_parameters())
        # A pipeline stage may train nothing (stage 3: only the projector, on stage 0); torch and
        # DeepSpeed still want a parameter group there.
        groups = (
            build_param_groups(named, opt.lr, opt.weight_decay, opt.part_lr)
            if trains
            else [{"params": [], "lr": opt.lr, "weight_decay": 0.0, "name": "none"}]
        )
        balanced = _equalise_group_count(groups)
        self.zero_stage = 1 if balanced is not None else 0
        groups = balanced or groups
        kwargs = dict(lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, foreach=False)
        if self.zero_stage == 1:
            optimizer = torch.optim.AdamW(groups, **kwargs)
        else:
            optimizer = _GridClippedAdamW(
                groups, max_norm=opt.grad_clip or math.inf, tp_rank=self.tp_rank, **kwargs
            )
        schedule = self.cfg.schedule

        def build_scheduler(opt: torch.optim.Optimizer) -> LambdaLR:
            # Built by DeepSpeed after it drops empty parameter groups, so the group counts agree.
            return LambdaLR(opt, lambda step: lr_multiplier(step, total_steps, schedule))

        return optimizer, build_scheduler

    # ------------------------------------------------------------------ training

    def eos_states(self, image_codes: torch.Tensor) -> torch.Tensor:
        """h_eos [N, d] on every rank of this pipe group (every stage must call it together)."""
        return pipeline_eos_states(
            self.local_layers,
            self.num_layers,
            image_codes,
            self.pipe_ranks,
            self.stage,
            self.shape.hidden_size,
            group=_pipe_group(),
        )

    def stage_inputs(self, micro_batches: Sequence[Batch]) -> list[tuple]:
        """Stage-0 input tuples; h_eos of all the step's images from one forward-only pass."""
        codes = [b.image_codes for b in micro_batches]
        if "continuous" in self.views:
            all_codes = torch.cat(codes) if sum(c.shape[0] for c in codes) else codes[0][:0]
            h_eos = (
                self.eos_states(all_codes)
                if all_codes.shape[0]
                else all_codes.new_zeros(0, self.shape.hidden_size).float()
            )
            h_eos = list(h_eos.split([c.shape[0] for c in codes]))
        else:
            h_eos = [torch.zeros(c.shape[0], self.shape.hidden_size) for c in codes]
        return [
            (b.pixel_values, b.image_codes, h, b.input_ids, b.labels, b.attention_mask)
            for b, h in zip(micro_batches, h_eos, strict=True)
        ]

    def train_step(self, micro_batches: Sequence[Batch]) -> tuple[float, dict[str, float], int]:
        """One optimizer step over this replica's `accumulation` micro-batches.

        Returns (loss averaged over micro-batches and dp replicas, metrics, input tokens of this replica).
        """
        if len(micro_batches) != self.accumulation:
            raise ValueError(
                f"train_step got {len(micro_batches)} micro-batches; the step has {self.accumulation}"
            )
        inputs = self.stage_inputs(micro_batches)
        dummy = torch.zeros(1)
        loss = self.engine.train_batch(iter([(x, dummy) for x in inputs]))
        norm = self.engine.get_global_grad_norm() if self.zero_stage else self._torch_optimizer.last_grad_norm
        self._grad_norm = float(norm) if norm is not None else math.nan
        return float(loss), {"loss/lm": float(loss)}, sum(self.input_tokens(b) for b in micro_batches)

    def input_tokens(self, batch: Batch) -> int:
        """Sequence positions the LLM processes for `batch` (ModelOutput.num_input_tokens): each image
        placeholder becomes the image's visual block."""
        per_image = visual_tokens_per_image(
            self.spec.num_codes, self.module.vision_tower.num_patches, self.spec.keep_ratio, self.views
        )
        return int(batch.attention_mask.sum()) + batch.num_images * (per_image - 1)

    @property
    def grad_norm(self) -> float:
        return self._grad_norm

    def learning_rates(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self._torch_optimizer.param_groups}

    # ------------------------------------------------------------------ state

    def save_state(self, directory: Path) -> None:
        """DeepSpeed's pipeline checkpoint: per-layer, per-tp-rank weights + ZeRO-1 optimizer shards."""
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False)

    def load_state(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {directory}/{CHECKPOINT_TAG}")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full MavenModel-named weights on rank 0 (None elsewhere); every rank must call it."""
        local = None
        if self.dp_rank == 0:  # megatron layers add `_extra_state` entries (None): not weights
            local = {
                k: v.detach().clone()
                for k, v in self.pipe.state_dict().items()
                if isinstance(v, torch.Tensor)
            }
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((self.tp_rank, local), gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(self.dims.tp)]
        for tp_rank, state in gathered:
            if state is not None:
                per_rank[tp_rank] |= state
        return unshard_state_dict(per_rank, self.num_layers)


class _GridClippedAdamW(torch.optim.AdamW):
    """AdamW that first clips by the gradient norm of the whole model (the pp x tp grid of this
    replica), as ``clip_grad_norm_`` does in one process: tp shards count on every tp rank,
    replicated parameters on tp rank 0 only. Used without ZeRO, where DeepSpeed's clipping indexes
    the first parameter with a gradient and fails on a pipeline stage that trains nothing."""

    def __init__(self, groups: list[dict], *, max_norm: float, tp_rank: int, **kwargs):
        super().__init__(groups, **kwargs)
        self.max_norm, self.tp_rank = max_norm, tp_rank
        self.last_grad_norm = math.nan

    @torch.no_grad()
    def step(self, closure=None):
        from megatron.core import parallel_state

        grads = [
            p.grad
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or self.tp_rank == 0)
        ]
        total = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
        dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
        norm = total.sqrt()
        self.last_grad_norm = float(norm)
        coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return super().step(closure)


def _equalise_group_count(groups: list[dict]) -> list[dict] | None:
    """The same number of non-empty parameter groups on every rank, or None (on every rank) where impossible.

    ZeRO-1 computes the grad norm group by group, each with an all-reduce over the whole pp x tp grid,
    so ranks with fewer groups (a later stage has no projector) would deadlock. Splitting a group in
    two with the same hyperparameters changes nothing for AdamW (it is per parameter); the per-group
    norms are then summed across ranks whatever parameters each holds, which is still the global norm.
    A stage with nothing to train (stage 3 trains only the projector, on pipeline stage 0) cannot be
    balanced: every rank gets None and the engine runs without ZeRO (see ``ThreeDEngine``).
    """
    groups = [dict(g) for g in groups if g["params"]]
    count = torch.tensor([len(groups)])
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    splittable = sum(len(g["params"]) for g in groups)  # at most one group per parameter
    feasible = torch.tensor([int(bool(groups) and splittable >= int(count))])
    dist.all_reduce(feasible, op=dist.ReduceOp.MIN)
    if not int(feasible):
        return None
    while len(groups) < int(count):
        largest = max(groups, key=lambda g: len(g["params"]))
        half = len(largest["params"]) // 2
        groups.append(largest | {"params": largest["params"][half:]})
        largest["params"] = largest["params"][:half]
    return groups


class _NamedParams:
    """Adapter so ``build_param_groups`` sees MavenModel names (same groups as every other engine)."""

    def __init__(self, named: list):
        self._named = named

    def named_parameters(self):
        return iter(self._named)


def _pipe_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()
