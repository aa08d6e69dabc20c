"""3D backend: megatron-core tensor parallel x DeepSpeed pipeline x ZeRO-1 data parallel.

The model is ``maven_dist/parallel/pipe_layers.py``'s layer list in a DeepSpeed ``PipelineModule``; each
rank builds only its stage's layers and reads only its tp slices of them from the MaVEn directory
(streamed, one full tensor in memory at a time). DeepSpeed's pipeline engine runs a whole optimizer
step at once, so this engine is step-level: :meth:`ThreeDEngine.train_step` takes the step's
micro-batches (this data-parallel replica's, every rank of the replica the same list), runs the
forward-only h_eos pass when the stage uses the continuous view, then DeepSpeed's 1F1B schedule,
gradient all-reduce over dp, clipping and the AdamW step.

Loss semantics equal ``LocalEngine``'s: each micro-batch's loss is the mean CE over its labelled
tokens; DeepSpeed averages over the gas micro-batches and the dp replicas, i.e. the same as one
process accumulating ``loss / (gas * dp)``.

It implements the engine contract (``maven_dist/parallel/engine.py``); the 3D specifics are the
``stage_inputs`` (h_eos of the step's images first), ``local_layers`` (this rank's pipeline layers) and
``module``, a MavenModel skeleton on the meta device (configs, layout and spec; no memory).

The loader's dp rank is ``dims.data_parallel_rank(rank)``: every tp and pp rank of a replica
gets the same micro-batches.

Stage 1 (``loss: selector_bce``) is not run on this backend: it trains a 3-layer MLP on frozen
features and needs no model parallelism; run it on the zero3 backend (the export is the same HF
layout, so stage 2 starts on 3d from it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoConfig, CLIPVisionConfig

from maven_dist.config import Config, ConfigError
from maven_dist.contract.batch import Batch
from maven_dist.contract.checkpoint_layout import Manifest
from maven_dist.contract.lengths import visual_tokens_per_image
from maven_dist.contract.vocab import VocabLayout
from maven_dist.model import hf_layout
from maven_dist.model.frontend import h_eos_spread
from maven_dist.model.maven import MavenModel, resolve_attn_implementation
from maven_dist.model.parts import part_of
from maven_dist.model.spec import MavenSpec
from maven_dist.parallel.convert import full_name, iter_maven_dir, placement, shard_tensor, unshard_state_dict
from maven_dist.parallel.deepspeed_common import (
    DeepSpeedEngineState,
    accelerator_device,
    base_ds_config,
    init_deepspeed_distributed,
    training_dtype,
)
from maven_dist.parallel.dims import ParallelDims
from maven_dist.parallel.engine import (
    VAL_METRICS,
    LayoutMismatch,
    NonFiniteGuard,
    StepResult,
    reduce_val_metrics,
)
from maven_dist.parallel.megatron_llama import LlamaShape, TPDecoderLayer, build_tp_config
from maven_dist.parallel.mixed_precision import Fp32MasterWeights
from maven_dist.parallel.optim import build_param_groups, lr_multiplier
from maven_dist.parallel.pipe_layers import InputStage, OutputStage, pipeline_eos_states
from maven_dist.parallel.topology import (
    build_topology,
    check_topologies_agree,
    maybe_init_model_parallel,
    pipe_ranks,
)

CHECKPOINT_TAG = "3d"


def build_ds_config(cfg: Config, dims: ParallelDims, accumulation: int, zero_stage: int = 1) -> dict:
    base = base_ds_config(cfg, dims, accumulation)
    if not zero_stage:  # DeepSpeed's BF16_Optimizer cannot run here: the engine keeps the masters itself
        base["bf16"] = {"enabled": False}
    return base | {
        # Without ZeRO, DeepSpeed's own clipping fails on a stage with nothing to train: the optimizer clips.
        "gradient_clipping": cfg.stage.optimizer.grad_clip if zero_stage else 0.0,
        # DeepSpeed refuses ZeRO >= 2 with pipeline parallelism; ZeRO-1 shards Adam state over dp.
        # Stage 0 only where a pipeline stage trains nothing (`_equalise_group_count`).
        "zero_optimization": {"stage": zero_stage},
        # Whole activations between stages (no slicing over tp): the tuple carries int tensors.
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
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


class ThreeDEngine(DeepSpeedEngineState):
    """Step-level engine for ``parallel.backend: 3d`` (see the module doc)."""

    checkpoint_tag = CHECKPOINT_TAG

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
        init_deepspeed_distributed()
        self.device = accelerator_device()
        self.dtype = training_dtype(cfg.stage)
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
        attn = resolve_attn_implementation(cfg.model.llm.attn_implementation, cfg.stage.dtype, "3d")
        specs += [
            LayerSpec(TPDecoderLayer, self.shape, tp_config, checkpointing, attn)
            for _ in range(self.num_layers)
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
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.pipe, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        if not self.ds_config["bf16"]["enabled"]:
            # The ZeRO-less bf16 path: DeepSpeed checked an fp32 model (its bf16 is off), the model now runs
            # in bf16 and _GridClippedAdamW updates the fp32 masters.
            self.pipe.to(self.dtype)
        self._use_weights_only_checkpoints()
        self.torch_optimizer = optimizer

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
        balanced = _equalise_group_count(groups, self.device)
        self.zero_stage = 1 if balanced is not None else 0
        groups = balanced or groups
        kwargs = dict(lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, foreach=False)
        if self.zero_stage == 1:
            # bf16: DeepSpeed keeps the fp32 masters (ZeRO-1 / BF16_Optimizer, its Megatron-DeepSpeed path).
            optimizer = torch.optim.AdamW(groups, **kwargs)
        else:
            # Without ZeRO DeepSpeed would wrap a bf16 model's optimizer in BF16_Optimizer, which fails on a
            # stage with nothing to train and clips by its own norm: this optimizer keeps the masters itself.
            masters = None
            if self.dtype != torch.float32 and trains:
                trainable = [(n, p) for n, p in named.named_parameters() if p.requires_grad]
                masters = Fp32MasterWeights(trainable)
                for (_, param), master in zip(trainable, masters.masters(), strict=True):
                    _copy_parallel_attributes(param, master)
                groups = build_param_groups(masters, opt.lr, opt.weight_decay, opt.part_lr)
            optimizer = _GridClippedAdamW(
                groups,
                max_norm=opt.grad_clip or math.inf,
                tp_rank=self.tp_rank,
                device=self.device,
                masters=masters,
                **kwargs,
            )
        schedule = self.cfg.schedule

        def build_scheduler(opt: torch.optim.Optimizer) -> LambdaLR:
            # Built by DeepSpeed after it drops empty parameter groups, so the group counts agree.
            return LambdaLR(opt, lambda step: lr_multiplier(step, total_steps, schedule))

        return optimizer, build_scheduler

    # ------------------------------------------------------------------ training

    def prepare_h_eos(self, image_codes: Callable[[], object], cache_dir: Path) -> None:
        """Nothing: this engine runs one forward-only pipeline pass per step (:meth:`stage_inputs`), which
        gathers nothing (no ZeRO-3 here)."""

    def eos_states(self, image_codes: torch.Tensor) -> torch.Tensor:
        """h_eos [N, d] on every rank of this pipe group (every stage must call it together)."""
        return pipeline_eos_states(
            self.local_layers,
            self.num_layers,
            image_codes,
            self.spec,
            self.pipe_ranks,
            self.stage,
            self.shape.hidden_size,
            group=_pipe_group(),
        )

    def stage_inputs(self, micro_batches: Sequence[Batch]) -> tuple[list[tuple], torch.Tensor | None]:
        """Stage-0 input tuples, with h_eos of all the step's images from one forward-only pass (when
        the selector runs), and that h_eos (for ``selector/h_eos_spread``)."""
        counts = [b.num_images for b in micro_batches]
        d = self.shape.hidden_size
        h_eos = None
        if self.module.selects_patches(self.views) and sum(counts):
            h_eos = self.eos_states(torch.cat([b.image_codes for b in micro_batches]))
            per_batch = list(h_eos.split(counts))
        else:  # no selector runs: a placeholder the input stage never reads
            per_batch = [torch.zeros(n, d, dtype=self.dtype, device=self.device) for n in counts]
        inputs = [
            (b.pixel_values, b.image_codes, h, b.input_ids, b.labels, b.attention_mask)
            for b, h in zip(micro_batches, per_batch, strict=True)
        ]
        return inputs, h_eos

    def train_step(self, batches: Iterator[Batch], guard: NonFiniteGuard, step: int) -> StepResult:
        """One optimizer step over this replica's `accumulation` micro-batches. DeepSpeed's pipeline
        schedule cannot drop a micro-batch, so a non-finite loss is only counted (the update is applied)."""
        micro_batches = [next(batches).to(self.engine.device) for _ in range(self.accumulation)]
        inputs, h_eos = self.stage_inputs(micro_batches)
        dummy = torch.zeros(1)
        loss = float(self.engine.train_batch(iter([(x, dummy) for x in inputs])))
        if math.isfinite(loss):
            guard.ok()
        else:
            guard.bad(step, [i for b in micro_batches for i in b.sample_ids], "update applied")
        metrics = {"loss/lm": loss}
        spread = h_eos_spread(h_eos)
        if spread is not None:
            metrics["selector/h_eos_spread"] = float(spread)
        return StepResult(
            loss=loss,
            metrics=metrics,
            grad_norm=self._global_grad_norm() if self.zero_stage else self.torch_optimizer.last_grad_norm,
            learning_rates=self.learning_rates(),
            samples=sum(b.num_samples for b in micro_batches),
            input_tokens=sum(self.input_tokens(b) for b in micro_batches),
            images=sum(b.num_images for b in micro_batches),
        )

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """val/loss: DeepSpeed's pipeline evaluation, `accumulation` micro-batches at a time (the h_eos pass
        first, as in training); the mean over micro-batches, then over the data-parallel replicas."""
        sums = torch.zeros(len(VAL_METRICS), dtype=torch.float64, device=self.device)
        counts = torch.zeros_like(sums)
        pending: list[Batch] = []
        dummy = torch.zeros(1)

        def run(chunk: list[Batch]) -> None:
            inputs, _ = self.stage_inputs(chunk)
            loss = self.engine.eval_batch(iter([(x, dummy) for x in inputs]), num_micro_batches=len(chunk))
            sums[0] += float(loss) * len(chunk)
            counts[0] += len(chunk)

        for batch in batches:
            pending.append(batch.to(self.engine.device))
            if len(pending) == self.accumulation:
                run(pending)
                pending = []
        if pending:
            run(pending)
        # Every tp and pp rank of a replica holds the replica's loss: dividing by the world size is the
        # mean over replicas.
        return reduce_val_metrics(sums, counts)

    def input_tokens(self, batch: Batch) -> int:
        """Sequence positions the LLM processes for `batch` (ModelOutput.num_input_tokens): each image
        placeholder becomes the image's visual block."""
        per_image = visual_tokens_per_image(
            self.spec.num_codes, self.module.vision_tower.num_patches, self.spec.keep_ratio, self.views
        )
        return int(batch.attention_mask.sum()) + batch.num_images * (per_image - 1)

    # ------------------------------------------------------------------ state

    def load(self, directory: Path, saved: Manifest) -> None:
        """DeepSpeed's pipeline checkpoint of the same layout (per-layer, per-tp-rank weights + ZeRO-1 shards)."""
        mine = {"dp": self.dims.dp, "tp": self.dims.tp, "pp": self.dims.pp}
        if saved.layout != mine:
            raise LayoutMismatch(
                f"{directory} was written by the layout {saved.layout}, this run is {mine}; resuming a 3D "
                "checkpoint on another layout is not supported: resume with the original one, or start a new "
                "stage from its export (maven merge, then stage.init_from)"
            )
        self._load_tag(directory, CHECKPOINT_TAG)

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full MavenModel-named weights on rank 0 (None elsewhere), on the CPU; every rank must call it.

        Streamed: each replica-0 rank sends its tensors to rank 0 one at a time, on the engine's device, and
        rank 0 moves each to the CPU as it arrives, so no GPU holds more than one tensor of another rank.
        (``gather_object`` of the state dicts pickled every rank's CUDA tensors whole into one buffer on rank
        0's GPU, the whole model at once, and unpickled them onto the other ranks' device ids.)"""
        local = None
        if self.dp_rank == 0:  # megatron layers add `_extra_state` entries (None): not weights
            local = {k: v.detach() for k, v in self.pipe.state_dict().items() if isinstance(v, torch.Tensor)}
        rank = dist.get_rank()
        listing = (
            None
            if local is None
            else (self.tp_rank, [(k, tuple(v.shape), v.dtype) for k, v in local.items()])
        )
        listings = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(listing, listings, dst=0)  # names, shapes and dtypes only
        if rank != 0:
            if local is not None:
                for tensor in local.values():
                    dist.send(tensor.contiguous(), dst=0)
            return None
        per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(self.dims.tp)]
        for source, entry in enumerate(listings):
            if entry is None:
                continue
            tp_rank, tensors = entry
            for name, shape, dtype in tensors:
                if source == 0:
                    value = local[name].to("cpu", copy=True)
                else:
                    buffer = torch.empty(shape, dtype=dtype, device=self.device)
                    dist.recv(buffer, src=source)
                    value = buffer.to("cpu")
                per_rank[tp_rank][name] = value
        return unshard_state_dict(per_rank, self.num_layers)


class _GridClippedAdamW(torch.optim.AdamW):
    """AdamW that first clips by the gradient norm of the whole model (the pp x tp grid of this
    replica), as ``clip_grad_norm_`` does in one process: tp shards count on every tp rank,
    replicated parameters on tp rank 0 only. Used without ZeRO, where DeepSpeed's clipping indexes
    the first parameter with a gradient and fails on a pipeline stage that trains nothing."""

    def __init__(
        self,
        groups: list[dict],
        *,
        max_norm: float,
        tp_rank: int,
        device: torch.device,
        masters: Fp32MasterWeights | None = None,
        **kwargs,
    ):
        super().__init__(groups, **kwargs)
        self.max_norm, self.tp_rank, self.device, self.masters = max_norm, tp_rank, device, masters
        self.last_grad_norm = math.nan

    @torch.no_grad()
    def step(self, closure=None):
        from megatron.core import parallel_state

        if self.masters is not None:  # bf16: the step's (dp-reduced) gradients move to the fp32 masters
            self.masters.accumulate_grads()

        grads = [
            p.grad
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or self.tp_rank == 0)
        ]
        if grads:
            total = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
        else:  # a pipeline stage that trains nothing still joins the reduction, on the engine's device
            total = torch.zeros((), device=self.device)
        dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
        norm = total.sqrt()
        self.last_grad_norm = float(norm)
        coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.mul_(coef)
        loss = super().step(closure)
        if self.masters is not None:
            self.masters.copy_to_model()
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.masters is not None:
            state["fp32_masters"] = self.masters.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        masters = state.pop("fp32_masters", None)
        super().load_state_dict(state)
        if self.masters is not None:
            if masters is None:
                raise LayoutMismatch(
                    "the checkpoint has no fp32 master weights: it was written by an fp32 stage"
                )
            self.masters.load_state_dict(masters)


def _equalise_group_count(groups: list[dict], device: torch.device) -> list[dict] | None:
    """The same number of non-empty parameter groups on every rank, or None (on every rank) where impossible.

    ZeRO-1 computes the grad norm group by group, each with an all-reduce over the whole pp x tp grid,
    so ranks with fewer groups (a later stage has no projector) would deadlock. Splitting a group in
    two with the same hyperparameters changes nothing for AdamW (it is per parameter); the per-group
    norms are then summed across ranks whatever parameters each holds, which is still the global norm.
    A stage with nothing to train (stage 3 trains only the projector, on pipeline stage 0) cannot be
    balanced: every rank gets None and the engine runs without ZeRO (see ``ThreeDEngine``).
    """
    groups = [dict(g) for g in groups if g["params"]]
    count = torch.tensor([len(groups)], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    splittable = sum(len(g["params"]) for g in groups)  # at most one group per parameter
    feasible = torch.tensor([int(bool(groups) and splittable >= int(count))], device=device)
    dist.all_reduce(feasible, op=dist.ReduceOp.MIN)
    if not int(feasible):
        return None
    while len(groups) < int(count):
        largest = max(groups, key=lambda g: len(g["params"]))
        half = len(largest["params"]) // 2
        groups.append(largest | {"params": largest["params"][half:]})
        largest["params"] = largest["params"][:half]
    return groups


def _copy_parallel_attributes(param: torch.nn.Parameter, master: torch.nn.Parameter) -> None:
    """A master counts in the grid's gradient norm as its parameter does (``_mark_parallel_attributes``)."""
    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride", "model_parallel"):
        if hasattr(param, attr):
            setattr(master, attr, getattr(param, attr))


class _NamedParams:
    """Adapter so ``build_param_groups`` sees MavenModel names (same groups as every other engine)."""

    def __init__(self, named: list):
        self._named = named

    def named_parameters(self):
        return iter(self._named)


def _pipe_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()
