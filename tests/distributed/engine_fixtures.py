"""A tiny stage set-up shared by the ZeRO-3 worker (every rank) and the single-process reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from maven_dist.config import Config, load_config
from maven_dist.contract.vocab import VocabLayout, extend_tokenizer
from maven_dist.train.builders import ModelSource, model_builder, model_spec
from tests.helpers.batches import make_batch

NUM_CODES = 8
MICRO = 3  # rows per make_batch
GLOBAL = 6  # two micro-batches per optimizer step: 2 ranks x 1, or 1 process x 2 accumulated


@dataclass
class StageSetup:
    cfg: Config
    builder: object
    layout: VocabLayout
    image_size: int
    num_patches: int


def build_stage_setup(
    base_dir: Path, stage: str, llm_dir: Path | None = None, overrides: list[str] = ()
) -> StageSetup:
    """The tiny `stage` on the base models in `base_dir` (the LLM from `llm_dir` when given), at test size."""
    llm_dir = llm_dir or base_dir / "llm"
    cfg = load_config(
        f"tests/recipes/tiny/{stage}.yaml",
        [
            f"run_dir={base_dir}/run",
            f"model.llm.path={llm_dir}",
            f"model.vision.path={base_dir}/tower",
            "model.llm.init=pretrained",
            "model.vision.init=pretrained",
            "model.discrete.codebook_size=64",
            f"model.discrete.num_codes={NUM_CODES}",
            "model.vocab.pad_to_multiple_of=128",
            "model.selector.hidden_size=16",
            f"stage.micro_batch_size={MICRO}",
            f"stage.global_batch_size={GLOBAL}",
            "stage.gradient_checkpointing=false",
            "stage.schedule.warmup_ratio=0",
            *overrides,
        ],
    )
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    layout = extend_tokenizer(tokenizer, cfg.model.discrete.codebook_size, cfg.model.vocab.pad_to_multiple_of)
    source = ModelSource("base", llm_dir, base_dir / "tower", llm_dir)
    builder = model_builder(cfg, source, layout, model_spec(cfg, tokenizer))
    from transformers import CLIPVisionConfig

    tower = CLIPVisionConfig.from_pretrained(base_dir / "tower")
    grid = tower.image_size // tower.patch_size
    return StageSetup(cfg, builder, layout, tower.image_size, grid * grid)


def micro_batches(setup: StageSetup, n: int) -> list:
    return [
        make_batch(setup.layout, NUM_CODES, setup.image_size, setup.num_patches, seed=i) for i in range(n)
    ]
