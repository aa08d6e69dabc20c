"""What the benches share: the hardware label, presets (a recipe and its shapes -> a random ``MavenModel``
and its batches), timing, and the check of a bench's figures.

Every bench is a script with ``main(argv) -> dict``: it prints its report and returns its figures, which
its smoke test (``tests/unit/test_benches.py``) runs at tiny size and checks with :func:`check_figures`.
A bench imports this module as ``harness`` when run as a script (bench/ is then on ``sys.path``) and as
``bench.harness`` from the repository root (the tests)::

    python bench/step.py --preset tiny        # the same shapes the smoke test uses: seconds
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from maven_dist.config import Config, load_config
from maven_dist.contract.batch import Batch
from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, VocabLayout
from maven_dist.model.maven import MavenModel
from maven_dist.model.parts import apply_trainable
from maven_dist.model.spec import MavenSpec

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
BOS, EOS = 1, 2  # LLaMA / Vicuna's <s> and </s>


# ---------------------------------------------------------------------- presets, models, batches


@dataclass(frozen=True)
class Preset:
    """A stage-4 recipe and what a bench changes in it."""

    recipe: Path
    overrides: tuple[str, ...]
    """``key=value`` overrides of the recipe (the trainer's merge order)."""
    text_vocab: int
    """Rows of the base LLM's vocabulary (its tokenizer's size; not part of the recipe)."""


PRESETS = {
    # The LLM body dominates the step, as at 7B: a 4-layer 768-wide LLM, a small text vocabulary next to
    # the 8192 SEED codes, a small CLIP tower at LLaVA-1.5's 336 px (576 patches).
    "cpu": Preset(
        RECIPES / "tiny" / "stage4.yaml",
        (
            "model.llm.hidden_size=768",
            "model.llm.num_layers=4",
            "model.llm.num_heads=12",
            "model.llm.num_kv_heads=12",
            "model.llm.intermediate_size=2048",
            "model.llm.max_position_embeddings=4096",
            "model.vision.image_size=336",
            "model.vision.hidden_size=256",
            "model.vision.num_layers=2",
            "model.vision.num_heads=4",
            "model.vision.intermediate_size=1024",
            "model.discrete.codebook_size=8192",
            "model.selector.hidden_size=256",
            "stage.micro_batch_size=2",
        ),
        text_vocab=4000,
    ),  # fmt: skip
    # Vicuna-7B v1.5 + CLIP ViT-L/14-336 + SEED codes, as recipes/maven-7b says (micro-batch 16, bf16).
    "7b": Preset(RECIPES / "maven-7b" / "stage4.yaml", (), text_vocab=32000),
    # The tiny recipe's shapes (112 px: 64 patches): what the smoke tests run.
    "tiny": Preset(RECIPES / "tiny" / "stage4.yaml", ("stage.micro_batch_size=2",), text_vocab=512),
}


def load_preset(name: str, overrides: list[str] = ()) -> tuple[Config, Preset]:
    """The preset's recipe with its overrides and then ``overrides``."""
    preset = PRESETS[name]
    return load_config(preset.recipe, [*preset.overrides, *overrides]), preset


def build_model(cfg: Config, text_vocab: int, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> MavenModel:  # fmt: skip
    """A random MavenModel of the recipe's shapes with the stage's trainable parts, in train mode."""
    m = cfg.model
    llm = LlamaConfig(vocab_size=text_vocab, hidden_size=m.llm.hidden_size, intermediate_size=m.llm.intermediate_size,
                      num_hidden_layers=m.llm.num_layers, num_attention_heads=m.llm.num_heads,
                      num_key_value_heads=m.llm.num_kv_heads, max_position_embeddings=m.llm.max_position_embeddings,
                      bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)  # fmt: skip
    tower = CLIPVisionConfig(image_size=m.vision.image_size, patch_size=m.vision.patch_size,
                             hidden_size=m.vision.hidden_size, intermediate_size=m.vision.intermediate_size,
                             num_hidden_layers=m.vision.num_layers, num_attention_heads=m.vision.num_heads)  # fmt: skip
    layout = VocabLayout.build(text_vocab, m.discrete.codebook_size, m.vocab.pad_to_multiple_of)
    spec = MavenSpec(select_layer=m.vision.select_layer, keep_ratio=m.selector.keep_ratio,
                     selector_hidden_size=m.selector.hidden_size, projector=m.projector.kind,
                     num_codes=m.discrete.num_codes, eos_token_id=EOS, bos_token_id=BOS)  # fmt: skip
    torch.manual_seed(cfg.seed)
    with torch.device(device):  # initialise on the GPU: a 7B LLM's host-side init takes minutes
        model = MavenModel.from_configs(
            llm, tower, layout, spec, attn_implementation=m.llm.attn_implementation
        )
    apply_trainable(model, cfg.stage.trainable)
    if cfg.stage.gradient_checkpointing:
        model.enable_activation_checkpointing()
    return model.to(dtype).train()


def make_batch(
    model: MavenModel, samples: int, images: int, text: int, device: str | torch.device = "cpu"
) -> Batch:
    """``samples`` rows of ``<s>``, ``images`` placeholders, ``text - 2`` text tokens and ``</s>``; the last
    half of the text and ``</s>`` are labelled (an answer after its prompt). Seeded by ``images``."""
    g = torch.Generator().manual_seed(images)
    layout, size = model.layout, model.vision_tower.tower.config.image_size
    words = torch.randint(3, layout.text_size, (samples, text - 2), generator=g)
    marks = torch.full((samples, images), IMAGE_PLACEHOLDER_ID)
    ids = torch.cat([torch.full((samples, 1), BOS), marks, words, torch.full((samples, 1), EOS)], dim=1)
    labels = ids.clone()
    labels[:, : 1 + images + (text - 2) // 2] = IGNORE_INDEX
    n = samples * images
    return Batch(
        pixel_values=torch.randn(n, 3, size, size, generator=g),
        image_codes=torch.randint(0, layout.codebook_size, (n, model.spec.num_codes), generator=g),
        input_ids=ids,
        labels=labels,
        attention_mask=torch.ones_like(ids),
        sample_ids=[f"{images}img-{i}" for i in range(samples)],
    ).to(device)


# ---------------------------------------------------------------------- timing


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """What waits for the device's queued work: ``torch.cuda.synchronize`` on a GPU, nothing on a CPU."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def timed(
    fn: Callable[[], object], repeats: int, device: str | torch.device = "cpu", warmup: int = 1
) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones, the device
    synchronised before and after each."""
    sync = synchronizer(device)
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


# ---------------------------------------------------------------------- the figures a bench returns


def check_figures(figures: Mapping, schema: Mapping, where: str = "figures") -> None:
    """Raise AssertionError naming the first entry of ``schema`` that ``figures`` lacks or holds another
    type of (a schema value is a type, a tuple of types, or a nested schema for a mapping)."""
    for key, expected in schema.items():
        assert key in figures, f"{where} lacks {key!r} (it has {sorted(map(str, figures))})"
        value = figures[key]
        if isinstance(expected, Mapping):
            assert isinstance(value, Mapping), f"{where}[{key!r}] is {type(value).__name__}, not a mapping"
            check_figures(value, expected, f"{where}[{key!r}]")
        else:
            assert isinstance(value, expected), f"{where}[{key!r}] = {value!r} is not {expected}"


# ---------------------------------------------------------------------- the hardware label


def hardware(device: str | torch.device | None = None) -> str:
    """One line naming what the numbers were measured on: the GPU when ``device`` is a CUDA device, then
    the host (CPU model, visible cores, RAM, OS) and torch with its intra-op thread count."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # platform.processor() is often empty on Linux
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)  # fmt: skip
    ram = ""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        ram = f"{next(int(line.split()[1]) for line in meminfo if line.startswith('MemTotal')) / 2**20:.0f} GiB RAM, "
    threads = torch.get_num_threads()
    host = (f"{cpu}, {os.cpu_count()} cores, {ram}{platform.system()} {platform.release()}, "
            f"torch {torch.__version__} ({threads} thread{'s' if threads != 1 else ''})")  # fmt: skip
    if device is not None and torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x{torch.cuda.device_count()} (CUDA {torch.version.cuda}); host: {host}"
    return host
