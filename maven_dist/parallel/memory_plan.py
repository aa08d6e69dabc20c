"""Per-GPU memory planner for both backends: ``maven plan RECIPE --gpus N --gpu-mem-gb 80``.

Like DeepSpeed's ``estimate_zero3_model_states_mem_needs`` it counts model states exactly from the
shapes (parameters, gradients, optimizer) and adds an activation estimate, then lists the layouts
that fit. Shapes come from the recipe (``model.llm``/``model.vision`` list them); the text vocabulary
from ``{model.llm.path}/config.json`` when it exists, else ``--text-vocab`` (Vicuna: 32000).

Byte counts per parameter (bf16 training, DeepSpeed's layout; fp32 runs use 4-byte weights/grads):

* ZeRO-3: weights 2, gradients 2 + 4 (the bf16 gradient partition, and the fp32 copy the optimizer step
  makes of it: ``stage3.py:_prepare_fp32_grad_for_sub_group`` flattens the partition, which copies it in
  fp32 runs too, so they count 4 + 4), optimizer 12 (fp32 master + Adam m, v; trainable), all
  partitioned over every GPU; plus the gathered working set as DeepSpeed bounds it: up to
  ``stage3_max_live_parameters`` elements live and a ``stage3_prefetch_bucket_size`` in flight (never
  more than the whole model); plus buffers: the contiguous gradient bucket and its reduce-scatter output
  (2 x ``reduce_bucket_size`` elements) and :data:`RUNTIME_BYTES` for the CUDA context, cuBLAS
  workspaces and NCCL's communicator buffers. The knobs are read from ``zero3_settings.py``, the module
  the engine's DeepSpeed config is built from. ``tests/unit/test_plan.py`` holds these terms to that
  config and to DeepSpeed's own estimator (``estimate_zero3_model_states_mem_needs``).
* 3D: weights 2 and gradients 4 (bf16 grad + DeepSpeed's fp32 accumulation buffer) of this GPU's
  pipeline stage, tp-sharded tensors divided by tp; optimizer 12 per trainable parameter divided by
  dp (ZeRO-1). Pipeline stage 0 holds the vision tower, selector, projector and input embedding,
  the last stage the head: the planner reports the heavier of the two.

Activations per transformer layer and micro-batch (s tokens, b rows, h width, f MLP width, t = tp,
e bytes per activation), counted from what ``TPDecoderLayer`` saves for backward (SDPA keeps a
log-sum-exp, not the s x s scores, but materialises the s x s mask):
``e * b * s * (6h + 2 * head_dim + (4h + 4f + heads) / t + s)``. With gradient checkpointing only
each layer's input (``e * s * b * h``) is kept, plus one layer recomputed at a time. The loss keeps
the labelled rows' hidden states (at most ``e * s * b * h``) and works on one chunk of at most
``LOSS_CHUNK_ROWS`` rows at a time, four fp32 logit-sized tensors of it: ``16 * min(s * b, 1024) * V / t``. With 1F1B, pipeline stage 0 keeps
``min(pp, gas)`` micro-batches of its layers in flight. The vision tower runs without autograd and
is not counted. Checked against the tiny CPU runs in ``tests/unit/test_plan.py`` and
``tests/distributed/test_3d_engine.py`` (errors in docs/parallel_3d.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

from maven_dist.config import Config, ConfigError, load_config
from maven_dist.contract.command_line import HelpFormatter
from maven_dist.contract.lengths import num_kept_patches
from maven_dist.contract.vocab import VocabLayout
from maven_dist.model.lm_loss import LOSS_CHUNK_ROWS
from maven_dist.parallel import zero3_settings

GB = 1024**3
RUNTIME_BYTES = 1.5 * GB
"""Per GPU, outside any tensor: the CUDA context (~0.5 GB with cuBLAS/cuDNN handles) and NCCL's buffers
(~4 MB per channel and peer, a few hundred MB on 8 GPUs). An allowance to be replaced by the figure
``make gpu-smoke`` measures (docs/performance.md)."""


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of the MaVEn pieces, split the way the 3D backend places them."""

    embed: int
    """Unified input embedding (text + new rows), tp-sharded, pipeline stage 0."""
    head: int
    """Unified output head, tp-sharded, last pipeline stage."""
    layer_sharded: int
    """One decoder layer's tp-sharded weights (q, k, v, o, gate, up, down)."""
    layer_replicated: int
    """One decoder layer's norms."""
    final_norm: int
    tower: int
    selector: int
    projector: int
    num_layers: int

    @property
    def total(self) -> int:
        layers = self.num_layers * (self.layer_sharded + self.layer_replicated)
        return self.embed + self.head + layers + self.final_norm + self.tower + self.selector + self.projector


def count_params(cfg: Config, layout: VocabLayout) -> ParamCounts:
    llm, vis = cfg.model.llm, cfg.model.vision
    h, f = llm.hidden_size, llm.intermediate_size
    head_dim = h // llm.num_heads
    attn = h * llm.num_heads * head_dim * 2 + 2 * h * llm.num_kv_heads * head_dim
    d, fv = vis.hidden_size, vis.intermediate_size
    patches = (vis.image_size // vis.patch_size) ** 2
    tower_layer = 4 * (d * d + d) + 2 * d * fv + fv + d + 4 * d
    tower = vis.num_layers * tower_layer + 3 * vis.patch_size**2 * d + (patches + 1) * d + d + 4 * d
    s = cfg.model.selector.hidden_size
    selector = (d + h) * s + s + s * s + s + s + 1
    projector = d * h + h + h * h + h if cfg.model.projector.kind == "mlp2x_gelu" else d * h + h
    return ParamCounts(
        embed=layout.padded_size * h,
        head=layout.padded_size * h,
        layer_sharded=attn + 3 * h * f,
        layer_replicated=2 * h,
        final_norm=h,
        tower=tower,
        selector=selector,
        projector=projector,
        num_layers=llm.num_layers,
    )


@dataclass(frozen=True)
class MemoryEstimate:
    backend: str
    dp: int
    tp: int
    pp: int
    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float = 0.0
    """Communication buckets (ZeRO-3) and the CUDA/NCCL runtime (:data:`RUNTIME_BYTES`, every backend)."""

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers


def _bytes(cfg: Config) -> tuple[int, int]:
    """(weight and activation bytes, gradient bytes) for the stage's dtype."""
    return (2, 2) if cfg.stage.dtype == "bf16" else (4, 4)


def sequence_length(cfg: Config) -> int:
    """Assembled positions per row: data.max_length (LLaVA truncates text + visual tokens to it)."""
    return cfg.data.max_length


def layer_activation_bytes(cfg: Config, tp: int, e: int, rows: int) -> float:
    """Bytes autograd keeps for one decoder layer and micro-batch (see the module doc)."""
    if cfg.stage.gradient_checkpointing:
        return e * sequence_length(cfg) * rows * cfg.model.llm.hidden_size
    return _full_layer(cfg, tp, e, rows)


def _trainable(cfg: Config, part: str) -> bool:
    return part in cfg.stage.trainable


def _head_logits_bytes(cfg: Config, layout: VocabLayout, tp: int) -> float:
    """The loss's activations: the labelled rows' hidden states it keeps (at most every position's), and
    while a chunk runs its logit-sized fp32 tensors (the two head outputs, their concatenation and the
    softmax or its gradient: 16 bytes per vocabulary entry) for at most ``LOSS_CHUNK_ROWS`` rows. The
    loss never holds the logits of the whole micro-batch (``maven_dist/model/lm_loss.py``)."""
    e, _ = _bytes(cfg)
    positions = sequence_length(cfg) * cfg.stage.micro_batch_size
    rows = e * positions * cfg.model.llm.hidden_size
    return rows + 16 * min(positions, LOSS_CHUNK_ROWS) * layout.padded_size / tp


def estimate_zero3(cfg: Config, layout: VocabLayout, world: int) -> MemoryEstimate:
    """Per-GPU bytes under ZeRO-3 on `world` GPUs."""
    return _estimate(cfg, layout, "zero3", world, 1, 1, 1)[0]


def estimate_3d_stages(
    cfg: Config, layout: VocabLayout, dp: int, tp: int, pp: int, accumulation: int
) -> list[MemoryEstimate]:
    """Per-GPU bytes of pipeline stage 0 and (pp > 1) of the last stage."""
    return _estimate(cfg, layout, "3d", dp, tp, pp, accumulation)


def _estimate(
    cfg: Config, layout: VocabLayout, backend: str, dp: int, tp: int, pp: int, accumulation: int
) -> list[MemoryEstimate]:
    counts = count_params(cfg, layout)
    e, g = _bytes(cfg)
    rows = cfg.stage.micro_batch_size
    llm = cfg.model.llm
    logits = _head_logits_bytes(cfg, layout, tp)
    text_share = layout.text_size / layout.padded_size

    def trainable_params(llm_part: int, new_rows_part: int = 0) -> int:
        return llm_part * _trainable(cfg, "llm") + new_rows_part * _trainable(cfg, "vocab_new_rows")

    if backend == "zero3":
        world = dp * tp * pp
        vocab_text = int(counts.embed * text_share)
        llm_params = (
            2 * vocab_text
            + counts.num_layers * (counts.layer_sharded + counts.layer_replicated)
            + counts.final_norm
        )
        new_rows = 2 * (counts.embed - vocab_text)
        trainable = (
            trainable_params(llm_params, new_rows)
            + counts.projector * _trainable(cfg, "projector")
            + counts.selector * _trainable(cfg, "selector")
        )
        buckets = zero3_settings.bucket_sizes(gpu=True)
        gathered = min(
            counts.total, zero3_settings.MAX_LIVE_PARAMETERS + buckets["stage3_prefetch_bucket_size"]
        )
        params = e * counts.total / world + e * gathered
        grads = (g + 4) * trainable / world  # the partition, and the fp32 copy the step flattens it into
        optimizer = 12 * trainable / world
        layers = llm.num_layers * layer_activation_bytes(cfg, 1, e, rows)
        if cfg.stage.gradient_checkpointing:
            layers += _full_layer(cfg, 1, e, rows)
        buffers = 2 * g * buckets["reduce_bucket_size"] + RUNTIME_BYTES
        return [MemoryEstimate("zero3", dp, tp, pp, params, grads, optimizer, layers + logits, buffers)]

    per_stage_layers = math.ceil(llm.num_layers / pp)
    layer_params = counts.layer_sharded / tp + counts.layer_replicated
    layer_trainable = layer_params * _trainable(cfg, "llm")
    vocab_t = counts.embed * text_share / tp
    vocab_n = counts.embed * (1 - text_share) / tp
    first = {
        "params": counts.tower
        + counts.selector
        + counts.projector
        + vocab_t
        + vocab_n
        + per_stage_layers * layer_params,
        "trainable": counts.projector * _trainable(cfg, "projector")
        + counts.selector * _trainable(cfg, "selector")
        + trainable_params(vocab_t, vocab_n)
        + per_stage_layers * layer_trainable,
        "in_flight": min(pp, accumulation),
        "logits": 0.0,
    }
    last = {
        "params": vocab_t + vocab_n + per_stage_layers * layer_params + counts.final_norm,
        "trainable": trainable_params(vocab_t + counts.final_norm, vocab_n)
        + per_stage_layers * layer_trainable,
        "in_flight": 1,
        "logits": logits,
    }
    if pp == 1:
        first["params"] += last["params"] - per_stage_layers * layer_params
        first["trainable"] += last["trainable"] - per_stage_layers * layer_trainable
        first["logits"] = logits
    stages = []
    for stage in (first, last) if pp > 1 else (first,):
        acts = stage["in_flight"] * per_stage_layers * layer_activation_bytes(cfg, tp, e, rows)
        if cfg.stage.gradient_checkpointing:
            acts += _full_layer(cfg, tp, e, rows)
        stages.append(
            MemoryEstimate(
                "3d",
                dp,
                tp,
                pp,
                e * stage["params"],
                (g + 4 * (e == 2)) * stage["trainable"],
                12 * stage["trainable"] / dp,
                acts + stage["logits"],
                RUNTIME_BYTES,
            )
        )
    return stages


def estimate(
    cfg: Config, layout: VocabLayout, backend: str, dp: int, tp: int, pp: int, accumulation: int
) -> MemoryEstimate:
    """Per-GPU bytes for one layout: the heaviest GPU (pipeline stage 0 or the last one for 3d)."""
    if backend == "zero3":
        return estimate_zero3(cfg, layout, dp * tp * pp)
    return max(estimate_3d_stages(cfg, layout, dp, tp, pp, accumulation), key=lambda est: est.total)


def _full_layer(cfg: Config, tp: int, e: int, rows: int) -> float:
    """One layer's saved tensors, counted from what ``TPDecoderLayer`` hands autograd (measured with
    saved-tensor hooks, docs/parallel_3d.md): per token 6h replicated (two RMSNorm inputs, scales and
    outputs, the linear inputs), RoPE cos/sin (2 x head_dim), q, repeated k and v and the attention
    output (4h, sharded), the SwiGLU tensors (4f, sharded), SDPA's log-sum-exp (heads, sharded); per
    row the s x s attention mask SDPA materialises in the activation dtype."""
    llm = cfg.model.llm
    s, h, f = sequence_length(cfg), llm.hidden_size, llm.intermediate_size
    per_token = 6 * h + 2 * (h // llm.num_heads) + (4 * h + 4 * f + llm.num_heads) / tp
    return e * rows * s * (per_token + s)


def text_vocab_size(cfg: Config, default: int) -> int:
    path = cfg.resolve_path(cfg.model.llm.path) / "config.json"
    return json.loads(path.read_text())["vocab_size"] if path.is_file() else default


def layouts(cfg: Config, gpus: int, gpus_per_node: int) -> list[tuple[str, int, int, int]]:
    """(backend, dp, tp, pp) layouts worth trying: tp within a node dividing the heads, pp dividing the layers."""
    llm = cfg.model.llm
    out = [("zero3", gpus, 1, 1)]
    for tp in (1, 2, 4, 8):
        if (
            tp > gpus_per_node
            or llm.num_heads % tp
            or llm.num_kv_heads % tp
            or cfg.model.vocab.pad_to_multiple_of % (128 * tp)
        ):
            continue
        for pp in (1, 2, 4, 8, 16):
            if tp * pp > gpus or gpus % (tp * pp) or pp > llm.num_layers or (tp, pp) == (1, 1):
                continue
            out.append(("3d", gpus // (tp * pp), tp, pp))
    return out


def plan(
    cfg: Config, gpus: int, gpu_mem_gb: float, text_vocab: int = 32000, gpus_per_node: int = 8
) -> list[tuple[MemoryEstimate, bool]]:
    layout = VocabLayout.build(
        text_vocab_size(cfg, text_vocab), cfg.model.discrete.codebook_size, cfg.model.vocab.pad_to_multiple_of
    )
    rows = []
    for backend, dp, tp, pp in layouts(cfg, gpus, gpus_per_node):
        per_step = cfg.stage.micro_batch_size * dp
        if cfg.stage.global_batch_size % per_step:
            continue
        est = estimate(cfg, layout, backend, dp, tp, pp, cfg.stage.global_batch_size // per_step)
        rows.append((est, est.total <= gpu_mem_gb * GB))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maven plan", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("recipe", help="stage recipe, e.g. recipes/maven-7b/stage4.yaml")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (tp stays inside a node)")
    parser.add_argument(
        "--text-vocab", type=int, default=32000, help="text rows when the LLM directory is not present"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    visual = (
        cfg.model.discrete.num_codes
        + 2
        + num_kept_patches(
            (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2, cfg.model.selector.keep_ratio
        )
    )
    print(
        f"{args.recipe}: stage {cfg.stage.name}, trains {cfg.stage.trainable}, micro-batch {cfg.stage.micro_batch_size} x "
        f"{sequence_length(cfg)} tokens ({visual} visual per image), {cfg.stage.dtype}, "
        f"checkpointing={'on' if cfg.stage.gradient_checkpointing else 'off'}; {args.gpus} GPUs x {args.gpu_mem_gb:g} GB"
    )
    print(
        f"{'backend':8} {'dp':>3} {'tp':>3} {'pp':>3} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} "
        f"{'buffers':>8} {'total':>8}  fits"
    )
    for est, fits in plan(cfg, args.gpus, args.gpu_mem_gb, args.text_vocab, args.gpus_per_node):
        print(
            f"{est.backend:8} {est.dp:3d} {est.tp:3d} {est.pp:3d} "
            + " ".join(
                f"{v / GB:8.2f}"
                for v in (est.params, est.grads, est.optimizer, est.activations, est.buffers, est.total)
            )
            + f"  {'yes' if fits else 'no'}"
        )
    print(
        "GB per GPU (GiB); 3d rows are the heavier of pipeline stage 0 and the last stage. buffers: ZeRO-3's "
        "gradient buckets and 1.5 GB for the CUDA context and NCCL. Leave ~10% for allocator fragmentation."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
