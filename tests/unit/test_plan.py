"""The memory planner: exact parameter counts, activation estimates against measured saved tensors,
ZeRO-3's model states against DeepSpeed's own estimator and the DeepSpeed config the engine builds, the
13B 3D recipe, and the CLI."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from transformers import CLIPVisionConfig, LlamaConfig

from maven_dist.config import load_config
from maven_dist.contract.vocab import VocabLayout
from maven_dist.model.maven import MavenModel
from maven_dist.model.spec import MavenSpec
from maven_dist.offline.base_models import clip_vision_config, llama_config
from maven_dist.parallel.memory_plan import _full_layer, _head_logits_bytes, count_params, main, plan
from tests.helpers.memory import peak_allocated_bytes

TINY = [
    *(
        f"model.llm.{k}={v}"
        for k, v in dict(
            hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128
        ).items()
    ),
    *(
        f"model.vision.{k}={v}"
        for k, v in dict(
            image_size=56, patch_size=14, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
        ).items()
    ),
    "model.discrete.codebook_size=64",
    "model.vocab.pad_to_multiple_of=256",
    "model.selector.hidden_size=16",
    "data.max_length=34",
    "stage.micro_batch_size=3",
    "stage.global_batch_size=6",
    "stage.dtype=fp32",
    "stage.gradient_checkpointing=false",
]
LAYOUT = VocabLayout.build(320, 64, 256)


def tiny_model() -> MavenModel:
    """The TINY overrides' MaVEn (uninitialised weights: only the shapes count here)."""
    llm = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=320,
        tie_word_embeddings=False,
    )
    tower = CLIPVisionConfig(
        image_size=56,
        patch_size=14,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return MavenModel.from_configs(llm, tower, LAYOUT, MavenSpec(selector_hidden_size=16), init_weights=False)


def test_parameter_count_is_exact():
    cfg = load_config("tests/recipes/tiny/stage4.yaml", TINY)
    assert count_params(cfg, LAYOUT).total == sum(p.numel() for p in tiny_model().parameters())


class _Saved:
    def __init__(self, exclude):
        self.total, self._seen = 0, {p.untyped_storage().data_ptr() for p in exclude}

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t


@pytest.fixture
def one_rank_model_parallel(tmp_path):
    from megatron.core import parallel_state

    from maven_dist.parallel.dims import ParallelDims
    from maven_dist.parallel.topology import maybe_init_model_parallel

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    dims = ParallelDims(dp=1, tp=1, pp=1, world_size=1)
    maybe_init_model_parallel(dims)
    yield dims
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def test_activation_estimate_matches_measured_memory(one_rank_model_parallel):
    """Layer and loss activations of the real 3D modules (tp=1) against the planner's formulas."""
    from maven_dist.parallel.megatron_llama import LlamaShape, TPDecoderLayer, build_tp_config
    from maven_dist.parallel.pipe_layers import OutputStage

    cfg = load_config("tests/recipes/tiny/stage4.yaml", TINY)
    config = build_tp_config(one_rank_model_parallel)
    shape = LlamaShape(64, 128, 2, 4, 2, 16, 1e-6, 10000.0)
    layer, head = TPDecoderLayer(shape, config), OutputStage(shape, LAYOUT, config)
    x = torch.randn(3, 34, 64, requires_grad=True)
    mask = torch.ones(3, 34, dtype=torch.long)
    labels = torch.randint(0, LAYOUT.padded_size, (3, 34))
    saved = _Saved(layer.parameters())
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        layer.block(x, mask)
    # The layer formula counts what the layer saves: within 1% (measured 499392 bytes, estimate 498576).
    assert abs(_full_layer(cfg, 1, 4, 3) - saved.total) <= 0.01 * saved.total

    # The loss: its peak over forward and backward with every position labelled (the planner's worst
    # case); the head's weights frozen, as their gradients are counted apart.
    head.requires_grad_(False)
    peak = peak_allocated_bytes(lambda: head((x, mask, labels)).backward())
    # An upper bound (every position's rows kept, four logit-sized copies of the chunk): measured
    # 467603 bytes, estimate 861696.
    estimate = _head_logits_bytes(cfg, LAYOUT, 1)
    assert peak <= estimate <= 2 * peak


def test_13b_3d_recipe_validates_and_fits_on_one_node():
    cfg = load_config("recipes/maven-13b/stage4_3d.yaml")
    assert (cfg.parallel.backend, cfg.parallel.tp, cfg.parallel.pp) == ("3d", 4, 2)
    rows = {(est.backend, est.tp, est.pp): (est, fits) for est, fits in plan(cfg, gpus=8, gpu_mem_gb=80)}
    est, fits = rows[("3d", 4, 2)]
    assert fits and est.dp == 1
    # ZeRO-1 over one replica shards nothing: 12 bytes per trainable parameter of the stage.
    assert est.optimizer > est.params * 5
    _, zero3_fits_small = rows[("zero3", 1, 1)]
    assert not plan(cfg, gpus=8, gpu_mem_gb=24)[0][1] or zero3_fits_small


def test_cli_prints_both_backends(capsys):
    main(["recipes/maven-13b/stage4_3d.yaml", "--gpus", "16", "--gpu-mem-gb", "80"])
    out = capsys.readouterr().out
    assert "zero3" in out and "3d" in out and " yes" in out
    assert "16 GPUs x 80 GB" in out


# ---------------------------------------------------------------------- ZeRO-3 against DeepSpeed

ZERO3_RECIPES = ["recipes/maven-7b/stage4.yaml", "recipes/maven-13b/stage4.yaml"]
GPU_COUNTS = (1, 8, 16, 64)


@pytest.fixture(scope="module", params=ZERO3_RECIPES)
def zero3_recipe(request):
    """A GPU recipe, its vocabulary and its MaVEn on the meta device (shapes only: what DeepSpeed would wrap),
    with the stage's parts set trainable as the engine sets them."""
    from maven_dist.model.parts import apply_trainable
    from maven_dist.parallel.memory_plan import text_vocab_size

    cfg = load_config(request.param)
    layout = VocabLayout.build(
        text_vocab_size(cfg, 32000), cfg.model.discrete.codebook_size, cfg.model.vocab.pad_to_multiple_of
    )
    llm_config, tower = llama_config(cfg.model.llm, layout.text_size), clip_vision_config(cfg.model.vision)
    spec = MavenSpec(selector_hidden_size=cfg.model.selector.hidden_size)
    with torch.device("meta"):
        model = MavenModel.from_configs(llm_config, tower, layout, spec, init_weights=False)
    apply_trainable(model, cfg.stage.trainable)
    return cfg, layout, model


def deepspeed_zero3_gpu_bytes(total: float, largest_layer: float, gpus: int) -> tuple[int, int]:
    """DeepSpeed's own per-GPU model-states estimate for ZeRO-3 with nothing offloaded, parameters
    partitioned at construction (our engine's zero.Init): (total, its largest-layer part)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu, largest = estimate_zero3_model_states_mem_needs(
        total,
        largest_layer,
        num_gpus_per_node=gpus,
        cpu_offload=False,
        cpu_offload_params=False,
        zero_init=True,
    )
    return gpu, largest


def sizes(model) -> tuple[int, int, int]:
    """(parameters, trained parameters, DeepSpeed's largest layer) of a model. DeepSpeed's
    ``model_to_params`` tells shared tensors apart by data pointer, which is 0 for every meta tensor, so
    the total is counted here (no weight is tied: ``tie_word_embeddings=False``); its largest layer is
    taken as it computes it."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trained, model_to_params(model)[1]


def test_zero3_model_states_cover_deepspeeds_estimate(zero3_recipe):
    """Against DeepSpeed's ``estimate_zero3_model_states_mem_needs`` (no offload, zero.Init). It prices every
    parameter as trained, at 18 bytes partitioned over the GPUs, plus 4 bytes per element of the largest
    layer for the working set. Stage 4 trains all but the CLIP tower and the selector, so the plan must
    come out at or above it at every GPU count; and where the formulas describe the same memory the
    plan's figure must be the larger one:

    * a trained parameter: the plan's 2 bytes of partitioned weight (counted for every parameter) and
      its gradient and optimizer bytes (2 + 4 + 12) against DeepSpeed's 18 per parameter, which it does
      not itemise. The plan's 20 include the 16-bit gradient partition DeepSpeed 0.19 allocates for every
      trained parameter (``stage3.py:grad_partitions_flat_buffer``), so it is meant to be the larger;
    * the gathered working set: the plan's bound (max_live_parameters + the prefetch bucket) against
      DeepSpeed's largest layer (the text embedding).
    """
    from maven_dist.parallel.memory_plan import estimate_zero3

    cfg, layout, model = zero3_recipe
    total, trained, largest = sizes(model)
    assert total == count_params(cfg, layout).total
    assert 0.9 * total < trained < total  # the tower and the selector stay frozen
    e = 2  # bf16 weights
    assert cfg.stage.dtype == "bf16"
    for gpus in GPU_COUNTS:
        est = estimate_zero3(cfg, layout, gpus)
        deepspeed_total, deepspeed_working_set = deepspeed_zero3_gpu_bytes(total, largest, gpus)
        assert est.params + est.grads + est.optimizer >= deepspeed_total, gpus
        per_parameter, _ = deepspeed_zero3_gpu_bytes(gpus, 0, gpus)  # 18 bytes: one parameter per GPU
        assert e + (est.grads + est.optimizer) * gpus / trained >= per_parameter
        gathered = est.params - e * total / gpus
        assert gathered >= deepspeed_working_set


def engine_zero_config(cfg, gpus: int, monkeypatch):
    """The ZeRO section the ZeRO-3 engine builds on a GPU for `gpus` ranks, as DeepSpeed reads it
    (``get_zero_config``, what ``DeepSpeedConfig`` calls): values, not this test's copies of them."""
    from deepspeed.runtime.zero.config import get_zero_config

    from maven_dist.parallel import zero3
    from maven_dist.parallel.dims import ParallelDims

    with monkeypatch.context() as patch:
        patch.setattr(zero3.torch.cuda, "is_available", lambda: True)
        ds_config = zero3.build_ds_config(cfg, ParallelDims(dp=gpus, tp=1, pp=1, world_size=gpus), 1)
    assert ds_config["bf16"]["enabled"] == (cfg.stage.dtype == "bf16")
    return get_zero_config(ds_config)


def test_zero3_plan_counts_the_engines_deepspeed_config(zero3_recipe, monkeypatch):
    """Every ZeRO-3 term from the config the engine hands DeepSpeed and from the model's own sizes:
    partitioned weights, the gathered set (max_live_parameters + the prefetch bucket), the 16-bit gradient
    partition and the step's fp32 copy of it, fp32 master weights and Adam moments, the gradient bucket
    and its reduce-scatter output, and the CUDA/NCCL allowance."""
    from maven_dist.parallel.memory_plan import RUNTIME_BYTES, estimate_zero3

    cfg, layout, model = zero3_recipe
    total, trained, _ = sizes(model)
    for gpus in GPU_COUNTS:
        zero = engine_zero_config(cfg, gpus, monkeypatch)
        assert zero.stage == 3 and zero.offload_optimizer is None and zero.offload_param is None
        est = estimate_zero3(cfg, layout, gpus)
        gathered = min(total, zero.max_live_parameters + zero.prefetch_bucket_size)
        assert est.params == pytest.approx(2 * total / gpus + 2 * gathered)
        assert est.grads == pytest.approx((2 + 4) * trained / gpus)
        assert est.optimizer == pytest.approx(12 * trained / gpus)
        assert est.buffers == pytest.approx(2 * 2 * zero.reduce_bucket_size + RUNTIME_BYTES)
        assert RUNTIME_BYTES >= 0.5 * 1024**3  # at least the CUDA context itself


@pytest.mark.parametrize(
    "knob, bytes_per_element",
    [
        ("stage3_prefetch_bucket_size", 2),  # gathered ahead of use, bf16
        ("stage3_max_live_parameters", 2),  # gathered and kept, bf16
        ("reduce_bucket_size", 2 * 2),  # the bf16 gradient bucket and its reduce-scatter output
    ],
)
def test_each_zero3_knob_moves_the_engine_and_the_plan_together(
    zero3_recipe, monkeypatch, knob, bytes_per_element
):
    """The engine and the planner read one module (``zero3_settings.py``): a knob changed there changes
    the DeepSpeed config the engine builds by the same elements, and the plan by their bytes."""
    from maven_dist.parallel import zero3_settings
    from maven_dist.parallel.memory_plan import estimate_zero3

    cfg, layout, _ = zero3_recipe
    gpus, extra = 8, 10_000_000
    before_zero, before = engine_zero_config(cfg, gpus, monkeypatch), estimate_zero3(cfg, layout, gpus)
    if knob == "stage3_max_live_parameters":
        monkeypatch.setattr(zero3_settings, "MAX_LIVE_PARAMETERS", zero3_settings.MAX_LIVE_PARAMETERS + extra)
    else:
        sizes_of = zero3_settings.bucket_sizes
        monkeypatch.setattr(
            zero3_settings, "bucket_sizes", lambda gpu: sizes_of(gpu) | {knob: sizes_of(gpu)[knob] + extra}
        )
    after_zero = engine_zero_config(cfg, gpus, monkeypatch)
    after = estimate_zero3(cfg, layout, gpus)
    field = {
        "stage3_prefetch_bucket_size": "prefetch_bucket_size",
        "stage3_max_live_parameters": "max_live_parameters",
    }
    name = field.get(knob, knob)
    assert getattr(after_zero, name) - getattr(before_zero, name) == extra
    assert after.total - before.total == pytest.approx(bytes_per_element * extra)


def test_zero3_gathered_set_is_never_more_than_the_model_and_fp32_copies_its_gradients():
    """The tiny model is smaller than max_live_parameters: the plan gathers all of it, not more. In fp32
    the gradient partition is 4 bytes and the step still makes its own fp32 copy of it
    (``stage3.py:_prepare_fp32_grad_for_sub_group`` flattens, that is copies, the partition)."""
    from maven_dist.model.parts import apply_trainable
    from maven_dist.parallel.memory_plan import estimate_zero3

    gpus = 2
    cfg = load_config("tests/recipes/tiny/stage4.yaml", TINY)
    model = tiny_model()
    apply_trainable(model, cfg.stage.trainable)
    total, trained, _ = sizes(model)
    fp32 = estimate_zero3(cfg, LAYOUT, gpus)
    assert fp32.params == pytest.approx(4 * total / gpus + 4 * total)
    assert fp32.grads == pytest.approx((4 + 4) * trained / gpus)
    bf16 = estimate_zero3(
        load_config("tests/recipes/tiny/stage4.yaml", [*TINY, "stage.dtype=bf16"]), LAYOUT, gpus
    )
    assert bf16.params == pytest.approx(2 * total / gpus + 2 * total)
    assert bf16.grads == pytest.approx((2 + 4) * trained / gpus)
