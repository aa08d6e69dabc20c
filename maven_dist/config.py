"""Typed run configuration: defaults <- recipe YAML <- ``--set key=value`` overrides.

Every component owns one nested dataclass section. Each field carries a one-line docstring (the
string literal under it). :func:`load_config` builds a :class:`Config` from a recipe file and
overrides, coercing and checking every value against its annotation, so a typo or a bad value
stops the run before anything is built, with a message that names the key, the value and what is
allowed. Cross-field rules live in each section's ``validate``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

Part = Literal["llm", "vocab_new_rows", "projector", "selector", "vision_tower"]
View = Literal["discrete", "continuous"]
StageName = Literal["stage1", "stage2", "stage3", "stage4"]
STAGE_NAMES: tuple[str, ...] = get_args(StageName)
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2", "auto"]
DataFormat = Literal["patch_labels", "discrete_alignment", "captions", "conversations"]


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key and the fix."""


@dataclass
class LLMConfig:
    path: str = "{run_dir}/base/llm"
    """Local HF directory of the base LLM (e.g. Vicuna-7B v1.5); `{run_dir}` is substituted."""
    init: Literal["pretrained", "random", "synthetic"] = "pretrained"
    """`pretrained` loads `path`; `random` first builds a LLaMA of the shape below and saves it to `path`;
    `synthetic` (the demo) builds it and pretrains it on the synthetic world's text first
    (maven_dist/offline/pretrain_llm.py)."""
    hidden_size: int = 4096
    """Model width (random init only)."""
    num_layers: int = 32
    """Decoder layers (random init only)."""
    num_heads: int = 32
    """Attention heads (random init only)."""
    num_kv_heads: int = 32
    """Key/value heads, < num_heads for grouped-query attention (random init only)."""
    intermediate_size: int = 11008
    """SwiGLU inner width (random init only)."""
    max_position_embeddings: int = 4096
    """Longest position the RoPE tables cover (random init only)."""
    attn_implementation: AttnImplementation = "sdpa"
    """Attention kernel: `sdpa` (torch's fused attention), `eager` (plain matmul-softmax, for debugging),
    `flash_attention_2` (CUDA with the flash-attn package; local and zero3 backends only), `auto` (flash-attn
    where it can run: CUDA, flash-attn installed, bf16, not 3d; else sdpa)."""

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.llm.num_heads={self.num_heads} is not a multiple of "
                f"model.llm.num_kv_heads={self.num_kv_heads}; pick kv heads that divide it"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.llm.hidden_size={self.hidden_size} is not divisible by "
                f"model.llm.num_heads={self.num_heads}"
            )


@dataclass
class VisionConfig:
    path: str = "{run_dir}/base/vision_tower"
    """Local HF directory of the CLIP vision tower (e.g. clip-vit-large-patch14-336)."""
    init: Literal["pretrained", "random", "synthetic"] = "pretrained"
    """`random` builds a CLIP vision tower of the shape below into `path` first; `synthetic` (the demo) builds it
    and pretrains it on the synthetic world's objects (maven_dist/offline/pretrain_tower.py)."""
    select_layer: int = -2
    """Hidden-state layer whose patch features are used (LLaVA-1.5: the penultimate, -2)."""
    image_size: int = 336
    """Input resolution (random init only; pretrained towers carry their own)."""
    patch_size: int = 14
    """Patch side in pixels (random init only)."""
    hidden_size: int = 1024
    """Feature width (random init only)."""
    num_layers: int = 24
    """Encoder layers (random init only)."""
    num_heads: int = 16
    """Attention heads (random init only)."""
    intermediate_size: int = 4096
    """MLP inner width (random init only)."""

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.vision.image_size={self.image_size} is not a multiple of "
                f"model.vision.patch_size={self.patch_size}"
            )
        if self.select_layer == 0 or abs(self.select_layer) > self.num_layers + 1:
            raise ConfigError(
                f"model.vision.select_layer={self.select_layer} is outside the tower's "
                f"{self.num_layers + 1} hidden states; use -2 (penultimate) or 1..{self.num_layers}"
            )


@dataclass
class DiscreteConfig:
    codebook_size: int = 8192
    """Visual codes in the tokenizer's codebook (SEED: 8192)."""
    num_codes: int = 32
    """Codes per image (SEED: 32 causal Q-Former queries)."""
    tokenizer: Literal["seed", "kmeans"] = "seed"
    """Which discrete tokenizer produced the codes stored in the data (offline)."""
    path: str = ""
    """Local tokenizer weights (SEED: seed_quantizer.pt or its directory; k-means: its directory), used by
    `maven tokenize` and recorded in every export so images can be tokenised at inference."""
    eva_path: str = ""
    """SEED only: the EVA ViT-g weights (eva_vit_g.pth), when seed_quantizer.pt does not carry them."""

    def validate(self) -> None:
        for name in ("codebook_size", "num_codes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.discrete.{name}={getattr(self, name)} must be >= 1")


@dataclass
class SelectorConfig:
    keep_ratio: float = 0.25
    """alpha: the fraction of continuous patches kept per image (paper: 0.25 -> 144 of 576)."""
    hidden_size: int = 1024
    """Width of the 3-layer MLP scoring [patch feature ; h_eos]."""
    label_threshold: float = 0.5
    """Score above which a patch counts as predicted relevant (precision/recall metrics)."""

    def validate(self) -> None:
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(
                f"model.selector.keep_ratio={self.keep_ratio} must be in (0, 1]; "
                "the paper uses 0.25 (144 of 576 patches) or 0.1"
            )


@dataclass
class ProjectorConfig:
    kind: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    """LLaVA-1.5 projector type mapping kept patch features to the LLM width."""


@dataclass
class VocabConfig:
    pad_to_multiple_of: int = 1024
    """Pad the unified vocabulary to this multiple; must be a multiple of 128*tp for every tp used."""
    embed_init: Literal["text_distribution", "mean"] = "text_distribution"
    """Input rows of the new tokens at the first stage: drawn from the text rows' distribution (distinct
    codes, so h_eos varies with the image) or at their mean (transformers' default); see model/vocab_init.py."""


@dataclass
class ModelConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    """The language model."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The continuous view: CLIP vision tower."""
    discrete: DiscreteConfig = field(default_factory=DiscreteConfig)
    """The discrete view: visual codes per image."""
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    """The patch selector."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """The continuous-token projector."""
    vocab: VocabConfig = field(default_factory=VocabConfig)
    """The unified vocabulary."""
    tokenizer_path: str = ""
    """Local HF tokenizer directory; empty means the one inside `model.llm.path`."""

    def validate(self) -> None:
        self.llm.validate()
        self.vision.validate()
        self.discrete.validate()
        self.selector.validate()
        if self.vocab.pad_to_multiple_of < 1 or self.vocab.pad_to_multiple_of % 128:
            raise ConfigError(
                f"model.vocab.pad_to_multiple_of={self.vocab.pad_to_multiple_of} must be a "
                "positive multiple of 128 (tensor-parallel vocab shards stay 128-aligned)"
            )


@dataclass
class DataConfig:
    path: str | list[str] = "{run_dir}/data/shards"
    """Directory of Arrow shards written by `maven prepare`, or a list of them read as one data set (stage 1:
    the COCO and the Visual Genome label shards); `{run_dir}` is substituted."""
    format: DataFormat = "conversations"
    """How this stage reads a shard row: patch_labels, discrete_alignment, captions or conversations
    (maven_dist/data/formats.py)."""
    template: Literal["vicuna_v1", "llama_2", "plain"] = "vicuna_v1"
    """Conversation template used to render and label-mask conversations."""
    max_length: int = 2048
    """Longest sequence after image expansion; longer samples are rejected at preparation."""
    num_workers: int = 2
    """Image-decoding worker processes per rank."""
    shuffle: bool = True
    """Shuffle deterministically per epoch and seed."""
    group_by_length: bool = True
    """Batch samples of similar modality (image count) and length together, so batches pad less."""
    t2i_fraction: float = 0.5
    """Stage 2: fraction of samples rendered as text -> image codes (the rest image -> text)."""
    strict: bool = False
    """Stop at the first bad sample instead of counting, logging and skipping it."""
    allow_too_long: bool = False
    """Train even when some samples no longer fit `max_length` at this stage's positions per image (a keep
    ratio or view other than the shards were prepared for): they are skipped. Off: the stage stops first."""
    val_fraction: float = 0.0
    """Hold out this fraction of `path`'s samples (chosen by a hash of each id) for val/loss; 0: none."""
    val_path: str = ""
    """Shards of a separate validation set (instead of `val_fraction`); `{run_dir}` is substituted."""
    packing: bool = False
    """Stages 2-4: pack several samples per row; a micro-batch is then `stage.micro_batch_size` rows of up to
    `max_length` positions, the batch sizes count rows, and `group_by_length` does not apply
    (docs/data_preparation.md, "Sequence packing")."""
    pack_max_images: int = 0
    """With `packing`: the most images one micro-batch may hold (bounds the tower and projector work); 0: no bound
    but the positions."""

    @property
    def paths(self) -> list[str]:
        """`path` as a list: the shards directories this stage reads, in order."""
        return [self.path] if isinstance(self.path, str) else list(self.path)

    def validate(self) -> None:
        if not self.paths or not all(self.paths):
            raise ConfigError(
                f"data.path={self.path!r} must name a shards directory or a non-empty list of them, none empty"
            )
        if len(set(self.paths)) != len(self.paths):
            raise ConfigError(
                f"data.path={self.path!r} lists a directory twice; list each shards directory once"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.val_path and self.val_fraction:
            raise ConfigError("data.val_path and data.val_fraction are both set: choose one validation set")
        if self.max_length < 16:
            raise ConfigError(f"data.max_length={self.max_length} must be >= 16")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")
        if not 0.0 <= self.t2i_fraction <= 1.0:
            raise ConfigError(f"data.t2i_fraction={self.t2i_fraction} must be in [0, 1]")
        if self.pack_max_images < 0:
            raise ConfigError(f"data.pack_max_images={self.pack_max_images} must be >= 0 (0: no bound)")


@dataclass
class OptimizerConfig:
    lr: float = 2e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (never applied to norms and biases)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    part_lr: dict[str, float] = field(default_factory=dict)
    """Per-part peak learning rates overriding `lr`, e.g. {projector: 2e-4}."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"stage.optimizer.lr={self.lr} must be > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"stage.optimizer.betas={self.betas} must be two numbers in [0, 1)")
        allowed = typing.get_args(Part)
        for part, lr in self.part_lr.items():
            if part not in allowed:
                raise ConfigError(
                    f"stage.optimizer.part_lr has unknown part {part!r}; allowed: {list(allowed)}"
                )
            if lr <= 0:
                raise ConfigError(f"stage.optimizer.part_lr.{part}={lr} must be > 0")


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_ratio: float = 0.03
    """Fraction of the stage's steps spent warming up linearly from 0."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of the peak learning rate."""

    def validate(self) -> None:
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"stage.schedule.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"stage.schedule.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


@dataclass
class StageConfig:
    name: StageName = "stage4"
    """Which of the four recipe stages this is."""
    trainable: list[Part] = field(default_factory=lambda: ["llm", "projector"])
    """Parts that receive gradients; everything else is frozen."""
    views: list[View] = field(default_factory=lambda: ["discrete", "continuous"])
    """Which visual views each image contributes to the LLM sequence."""
    loss: Literal["lm", "selector_bce"] = "lm"
    """Next-token cross-entropy on labelled tokens, or BCE of selector scores on patch labels."""
    init_from: str = ""
    """Where weights come from: a previous stage's name (its export), a local directory, or empty for the base models."""
    init_missing: Literal["error", "base"] = "error"
    """If `init_from` names a stage with no export yet: stop (`error`) or start from the base models with a warning (`base`)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer settings."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    micro_batch_size: int = 16
    """Samples per rank per forward/backward (with `data.packing`: packed rows, each of several samples)."""
    global_batch_size: int = 256
    """Samples per optimizer step across all ranks (micro * dp * accumulation); with `data.packing`: rows."""
    max_steps: int = 0
    """Optimizer steps; 0 means derive from `epochs`."""
    epochs: float = 1.0
    """Passes over the data when `max_steps` is 0."""
    dtype: Literal["fp32", "bf16"] = "bf16"
    """Training precision of weights and activations, on every device (bf16: fp32 master weights; fp32: TF32 matmuls on GPU)."""
    gradient_checkpointing: bool = True
    """Recompute decoder activations in backward to save memory."""
    log_every: int = 10
    """Log metrics every this many optimizer steps."""
    eval_every: int = 0
    """Compute val/loss every this many steps (and always at the end, when the data has a validation set); 0: only at the end."""
    val_image_control: bool = True
    """Validate a second time with each sample's images swapped for another's: ``val/visual_gain``, how much
    the images help predict the text (``maven_dist/train/validation.py``; stages with a language-model loss)."""
    max_bad_steps: int = 5
    """Stop after this many consecutive non-finite losses."""

    def validate(self) -> None:
        self.optimizer.validate()
        self.schedule.validate()
        if not self.trainable:
            raise ConfigError("stage.trainable is empty: name at least one part to train")
        if not self.views:
            raise ConfigError("stage.views is empty: use [discrete], [continuous] or both")
        if "vision_tower" in self.trainable:
            raise ConfigError(
                "stage.trainable contains 'vision_tower': MaVEn keeps the CLIP tower frozen in every stage"
            )
        if self.loss == "selector_bce" and self.trainable != ["selector"]:
            raise ConfigError(
                f"stage.loss=selector_bce trains only the selector, but stage.trainable={self.trainable}; "
                "set stage.trainable=[selector]"
            )
        if "selector" in self.trainable and self.loss != "selector_bce":
            raise ConfigError(
                "stage.trainable contains 'selector' but stage.loss=lm gives it no gradient "
                "(top-k selection is not differentiable); use stage.loss=selector_bce"
            )
        if self.micro_batch_size < 1:
            raise ConfigError(f"stage.micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"stage.global_batch_size={self.global_batch_size} is not a multiple of "
                f"stage.micro_batch_size={self.micro_batch_size}"
            )
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs <= 0):
            raise ConfigError(
                f"stage.max_steps={self.max_steps}, stage.epochs={self.epochs}: set max_steps > 0 or epochs > 0"
            )
        if self.log_every < 1:
            raise ConfigError(f"stage.log_every={self.log_every} must be >= 1")
        if self.eval_every < 0:
            raise ConfigError(f"stage.eval_every={self.eval_every} must be >= 0 (0: only at the end)")


@dataclass
class ParallelConfig:
    backend: Literal["zero3", "3d"] = "zero3"
    """`zero3`: HF model under DeepSpeed ZeRO-3; `3d`: megatron-core TP x DeepSpeed PP x ZeRO-1 DP."""
    tp: int = 1
    """Tensor-parallel degree (3d backend)."""
    pp: int = 1
    """Pipeline-parallel degree (3d backend)."""
    single_process: Literal["local", "zero3"] = "local"
    """The engine of a world of one: `local` (plain PyTorch, the reference) or `zero3` (DeepSpeed ZeRO-3 on one
    rank, e.g. its bf16 and NCCL paths on one GPU: `make gpu-smoke`; start it with torchrun)."""

    def validate(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.backend == "zero3" and (self.tp > 1 or self.pp > 1):
            raise ConfigError(
                f"parallel.backend=zero3 with tp={self.tp}, pp={self.pp}: ZeRO-3 is pure data "
                "parallel; set parallel.backend=3d for tensor/pipeline parallelism"
            )


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    """Save full training state every this many optimizer steps (and at the end)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints; older ones are deleted after a good save."""
    resume: bool = True
    """Resume automatically from the latest valid checkpoint of this stage."""

    def validate(self) -> None:
        if self.every_steps < 1:
            raise ConfigError(f"checkpoint.every_steps={self.every_steps} must be >= 1")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last} must be >= 1")


@dataclass
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty means a SQLite store at {run_dir}/mlflow.db."""
    experiment: str = "maven"
    """MLflow experiment (one per recipe family)."""
    enabled: bool = True
    """Send the run to MLflow (rank 0 records it in the stage directory either way)."""
    flush_interval_s: float = 5.0
    """Seconds between syncs of rank 0's record (metrics.jsonl, params, tags, artifacts) to the store."""
    system_metrics_interval_s: float = 30.0
    """Seconds between psutil CPU/memory (and CUDA memory) samples logged as system/*; 0 disables."""
    http_timeout_s: float = 10.0
    """Per-request HTTP timeout against a tracking server (MLFLOW_HTTP_REQUEST_TIMEOUT unless set)."""

    def validate(self) -> None:
        for name in ("flush_interval_s", "http_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"tracking.{name}={getattr(self, name)} must be > 0")
        if self.system_metrics_interval_s < 0:
            raise ConfigError(
                f"tracking.system_metrics_interval_s={self.system_metrics_interval_s} must be >= 0 (0 disables)"
            )
        if not self.experiment.strip():
            raise ConfigError("tracking.experiment is empty; name the recipe family, e.g. maven-7b")


@dataclass
class DemoConfig:
    enabled: bool = False
    """This recipe trains on the demo assets (`maven prepare-demo` builds what is missing: synthetic images,
    tokenizer, base models (random or pretrained on the world), shards, patch labels, visual codes and the
    held-out benchmarks; see maven_dist/offline/demo.py)."""
    seed: int = 0
    """The world's seed: its images, questions, base models, visual codes and benchmarks. The recipe's
    ``seed`` (the training's: initialisation, data order) is another, so that seeds of one ablation arm
    train on one world (``seeds:`` in a sweep file)."""
    num_images: int = 160
    """Synthetic training images to generate."""
    questions_per_image: int = 1
    """Question turns in each training image's conversation (maven_dist/offline/synthetic_qa.py); two-image
    comparisons come as one more sample per image."""
    question_kinds: list[Literal["colour", "shape", "exists", "count", "yes_no", "compare"]] = field(
        default_factory=lambda: ["colour", "shape", "exists", "count", "yes_no", "compare"]
    )
    """The kinds of question the training conversations ask (the benchmarks ask every kind)."""
    max_objects: int = 5
    """Most objects in one synthetic image (1 to this many, training and held-out alike)."""
    image_size: int = 112
    """Side of the larger dimension of each synthetic image."""
    tokenizer_vocab_size: int = 512
    """Text vocabulary of the tokenizer trained on the synthetic texts."""
    heldout_images: int = 48
    """Images drawn apart from the training images (another seed) for the benchmarks `eval` scores."""
    benchmark_questions: int = 16
    """Questions per benchmark-format task of the synthetic benchmark set (vqav2, gqa, ..., demon)."""
    heldout_per_kind: int = 16
    """Questions per kind of the held-out set (task `heldout`: colour, shape, exists, count, yes_no, compare,
    choice)."""
    llm_steps: int = 300
    """Pretraining steps of a `synthetic` LLM on the world's text."""
    llm_text_scenes: int = 0
    """Scenes described in text but not drawn, added to a `synthetic` LLM's pretraining text (their captions
    and conversations) beside the training images': the LLM reads more of its world than the images show."""
    tower_steps: int = 600
    """Pretraining steps of a `synthetic` vision tower on the world's objects."""


@dataclass
class EvalConfig:
    enabled: bool = False
    """`maven pipeline` ends by scoring the last stage's export with `maven eval` (results in MLflow)."""
    tasks: list[str] = field(default_factory=list)
    """Benchmarks to run (docs/evaluation.md); empty: every task found under `data`."""
    data: str = ""
    """Benchmark root (`{run_dir}` is substituted); empty: the synthetic benchmark set."""
    batch_size: int = 8
    """Questions per forward."""
    max_new_tokens: int = 32
    """Longest generated answer."""
    controls: list[Literal["blank", "swap", "none"]] = field(default_factory=list)
    """Image-blind controls to score as well (`maven eval --control`): the majority baseline and the visual
    gain over each control, per task and metric (maven_dist/eval/controls.py)."""

    def validate(self) -> None:
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}={getattr(self, name)} must be >= 1")


@dataclass
class Config:
    run_dir: str = "runs/default"
    """Everything the run writes (checkpoints, MLflow store, logs, exports) goes under here."""
    seed: int = 0
    """Seed for weights built at random, data order and dropout."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The MaVEn model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    stage: StageConfig = field(default_factory=StageConfig)
    """What this stage trains and how."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking."""
    demo: DemoConfig = field(default_factory=DemoConfig)
    """The demo assets: synthetic data and random base models (the tiny recipe: CPU demo and tests)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Benchmarks `maven pipeline` runs on the final export."""

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.stage.validate()
        self.parallel.validate()
        self.checkpoint.validate()
        self.tracking.validate()
        self.eval.validate()
        self._validate_stage_data()
        if self.parallel.backend == "3d" and self.model.llm.attn_implementation == "flash_attention_2":
            raise ConfigError(
                "model.llm.attn_implementation=flash_attention_2 with parallel.backend=3d: the 3D decoder "
                "(megatron-core layers) runs its own attention, torch SDPA (a fused kernel on GPU) or eager; "
                "set model.llm.attn_implementation=sdpa, or use parallel.backend=zero3 for flash-attn"
            )
        if self.model.llm.attn_implementation == "flash_attention_2" and self.stage.dtype == "fp32":
            raise ConfigError(
                "model.llm.attn_implementation=flash_attention_2 with stage.dtype=fp32: flash-attn runs in "
                "bf16/fp16 only; set stage.dtype=bf16, or model.llm.attn_implementation=sdpa"
            )
        if self.data.packing and self.parallel.backend == "3d":
            raise ConfigError(
                "data.packing=true with parallel.backend=3d: the 3D decoder (megatron-core layers in a DeepSpeed "
                "pipeline) takes one sample per row, with no per-sample positions or block-diagonal mask; set "
                "data.packing=false, or use parallel.backend=zero3 to pack"
            )
        tp = self.parallel.tp
        if self.model.vocab.pad_to_multiple_of % (128 * tp):
            raise ConfigError(
                f"model.vocab.pad_to_multiple_of={self.model.vocab.pad_to_multiple_of} is not a "
                f"multiple of 128*parallel.tp={128 * tp}; raise it so each TP shard stays 128-aligned"
            )

    def _validate_stage_data(self) -> None:
        """What a stage trains on and what it feeds the LLM must agree: the loss, ``stage.views`` and
        ``data.format`` (the columns the data must have follow from these, see data/formats.py)."""
        stage, fmt = self.stage, self.data.format
        if (stage.loss == "selector_bce") != (fmt == "patch_labels"):
            raise ConfigError(
                f"stage.loss={stage.loss} with data.format={fmt}: the selector loss trains on patch labels and "
                "patch labels train only the selector; use loss selector_bce with format patch_labels (stage 1), "
                "or loss lm with another format"
            )
        if stage.loss == "selector_bce" and sorted(stage.views) != ["continuous", "discrete"]:
            raise ConfigError(
                f"stage.views={stage.views} with stage.loss=selector_bce: the selector scores the continuous "
                "view's patches against the discrete view's h_eos; set stage.views=[discrete, continuous]"
            )
        if self.data.packing and fmt == "patch_labels":
            raise ConfigError(
                "data.packing=true with data.format=patch_labels: stage 1 has no text to pack (its micro-batches "
                "are images); set data.packing=false"
            )
        if fmt == "discrete_alignment" and stage.views != ["discrete"]:
            raise ConfigError(
                f"stage.views={stage.views} with data.format=discrete_alignment: discrete alignment (stage 2) "
                "feeds images as their codes only; set stage.views=[discrete]"
            )

    def resolve_path(self, path: str) -> Path:
        """Substitute `{run_dir}` in a configured path."""
        return Path(path.replace("{run_dir}", self.run_dir))

    @property
    def stage_dir(self) -> Path:
        """Where this stage writes checkpoints and its export."""
        return Path(self.run_dir) / self.stage.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes what training computes (not where it writes or logs)."""
        d = self.to_dict()
        for volatile in ("run_dir", "tracking", "checkpoint", "demo", "eval"):
            d.pop(volatile)
        d["stage"].pop("log_every")
        d["stage"].pop("eval_every")  # when val/loss is computed changes nothing trained
        d["stage"].pop("val_image_control")  # nor does the validation's control pass
        d["data"].pop("val_path")
        d["data"].pop("allow_too_long")  # a gate before training: the samples it lets through are skipped
        d["data"].pop("num_workers")  # the loader resumes exactly with any worker count
        # The attention kernel (numerics in the last bits) and packing (the micro-batches) stay in: a run
        # resumed with either changed would not reproduce its losses.
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated Config: defaults <- recipe YAML (with `inherit:` chains) <- overrides."""
    raw: dict[str, Any] = {}
    if recipe is not None:
        raw = _load_yaml_with_inherit(Path(recipe), seen=())
    for item in overrides or []:
        _apply_override(raw, item)
    cfg = _build(Config, raw, prefix="")
    cfg.validate()
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with load_config)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _load_yaml_with_inherit(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"recipe {path} does not exist; recipes live under recipes/ (e.g. recipes/tiny/stage4.yaml)"
        )
    if path.resolve() in seen:
        raise ConfigError(f"recipe {path}: `inherit` cycle through {[str(p) for p in seen]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping at top level, got {type(data).__name__}")
    parents = data.pop("inherit", None)
    if parents is None:
        return data
    merged: dict[str, Any] = {}
    # A list of parents merges left to right, then this file on top.
    for parent in parents if isinstance(parents, list) else [parents]:
        merged = _deep_merge(merged, _load_yaml_with_inherit(path.parent / parent, seen + (path.resolve(),)))
    return _deep_merge(merged, data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.path=value (e.g. stage.max_steps=10)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"unknown key '{key}' in {where}; allowed: {sorted(fields)}")
    kwargs = {name: _coerce(hints[name], raw[name], f"{prefix}{name}") for name in fields if name in raw}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=key + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:
            # `str | list[str]`: a list takes the list member, anything else the first other one.
            lists = [a for a in inner if typing.get_origin(a) is list]
            others = [a for a in inner if typing.get_origin(a) is not list]
            tp = lists[0] if isinstance(value, list) and lists else others[0]
            return _coerce(tp, value, key)
        return _coerce(inner[0], value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"config field {key} has unsupported annotation {tp!r}")
