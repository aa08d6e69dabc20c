"""Builders for one stage: where weights come from, the tokenizer, the loader and the engine."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from maven_dist.config import STAGE_NAMES, Config, ConfigError
from maven_dist.contract.vocab import VocabLayout, extend_tokenizer
from maven_dist.data.image_transform import ImageTransform
from maven_dist.data.templates import CHAT_TEMPLATES
from maven_dist.data.tokenizer import load_text_tokenizer
from maven_dist.model import hf_layout
from maven_dist.model.maven import MavenModel, resolve_attn_implementation
from maven_dist.model.parts import apply_trainable
from maven_dist.model.spec import MavenSpec
from maven_dist.parallel.dims import ParallelDims
from maven_dist.parallel.distributed import DistEnv, print0
from maven_dist.parallel.engine import Engine
from maven_dist.parallel.local import LocalEngine


@dataclass(frozen=True)
class ModelSource:
    """Where a stage's starting weights live."""

    kind: Literal["base", "maven"]
    """`base`: a base LLM + CLIP tower (stage 1); `maven`: a saved MaVEn directory (a stage export)."""
    path: Path
    """The MaVEn directory, or the base LLM directory."""
    tower_dir: Path
    """The vision tower directory (its preprocessor config defines the image transform)."""
    tokenizer_dir: Path


def resolve_model_source(cfg: Config, env: DistEnv) -> ModelSource:
    """`init_from` -> a directory: empty = base models, a stage name = that stage's export, else a path."""
    init = cfg.stage.init_from
    if init in STAGE_NAMES:
        export = Path(cfg.run_dir) / init / "export"
        if (export / hf_layout.CONFIG_FILE).is_file():
            return _maven_source(export)
        if cfg.stage.init_missing == "error":
            raise FileNotFoundError(
                f"stage.init_from={init}: {export} does not exist. Run {init} first "
                f"(maven pipeline), or set stage.init_from to a MaVEn directory"
            )
        print0(
            f"[{cfg.stage.name}] WARNING: {export} not found; starting from the base models (stage.init_missing=base)"
        )
    elif init:
        path = Path(init)
        if not (path / hf_layout.CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"stage.init_from={init} is not a saved MaVEn directory (no {hf_layout.CONFIG_FILE})"
            )
        return _maven_source(path)
    llm_dir = cfg.resolve_path(cfg.model.llm.path)
    tower_dir = cfg.resolve_path(cfg.model.vision.path)
    tokenizer_dir = cfg.resolve_path(cfg.model.tokenizer_path) if cfg.model.tokenizer_path else llm_dir
    for what, path in (("model.llm.path", llm_dir), ("model.vision.path", tower_dir)):
        if not path.is_dir():
            if cfg.demo.enabled:
                raise FileNotFoundError(
                    f"{what}={path} does not exist: this recipe trains on the demo assets; build them first with "
                    f"`maven prepare-demo RECIPE --set run_dir={cfg.run_dir}` (maven pipeline does it itself)"
                )
            raise FileNotFoundError(f"{what}={path} does not exist: point it at a local HF model directory")
    return ModelSource("base", llm_dir, tower_dir, tokenizer_dir)


def _maven_source(path: Path) -> ModelSource:
    return ModelSource("maven", path, path / hf_layout.TOWER_DIR, path / hf_layout.LLM_DIR)


def stage_template(cfg: Config) -> str:
    """The conversation template this stage trains with (captions and discrete alignment: ``plain``)."""
    return cfg.data.template if cfg.data.format == "conversations" else "plain"


def discrete_tokenizer_files(cfg: Config) -> hf_layout.DiscreteTokenizerFiles | None:
    """The discrete tokenizer every export records (None, with a warning, where the recipe's is absent)."""
    d = cfg.model.discrete
    path = cfg.resolve_path(d.path) if d.path else None
    if path is None or not path.exists():
        print0(
            f"[{cfg.stage.name}] WARNING: model.discrete.path={d.path!r} does not exist; the export will not "
            "carry its discrete tokenizer, so it cannot tokenise new images (maven chat, maven eval)"
        )
        return None
    eva = cfg.resolve_path(d.eva_path) if d.eva_path else None
    return hf_layout.DiscreteTokenizerFiles(d.tokenizer, path, eva)


def load_stage_tokenizer(cfg: Config, source: ModelSource):
    """The tokenizer extended with the visual vocabulary, with the stage's chat template, and its layout
    (checked against a saved model's)."""
    tokenizer = load_text_tokenizer(source.tokenizer_dir)
    tokenizer.chat_template = CHAT_TEMPLATES[stage_template(cfg)]
    layout = extend_tokenizer(tokenizer, cfg.model.discrete.codebook_size, cfg.model.vocab.pad_to_multiple_of)
    if source.kind == "maven":
        saved = VocabLayout(**hf_layout.read_maven_config(source.path)["vocab"])
        if saved != layout:
            raise ConfigError(
                f"the recipe's vocabulary {layout} differs from the one saved in {source.path} ({saved}); "
                "model.discrete.codebook_size and model.vocab.pad_to_multiple_of must match across stages"
            )
    return tokenizer, layout


def build_stage_loader(
    cfg: Config,
    tokenizer,
    layout: VocabLayout,
    source: ModelSource,
    dp_rank: int,
    dp_size: int,
    split: Literal["train", "val"] = "train",
):
    """The stage's training loader, or (``split="val"``) its validation loader (None without a validation set)."""
    from maven_dist.data.loader import build_loader

    transform = ImageTransform.from_pretrained(source.tower_dir)
    return build_loader(cfg, tokenizer, layout, dp_rank, dp_size, transform=transform, split=split)


def model_spec(cfg: Config, tokenizer) -> MavenSpec:
    m = cfg.model
    return MavenSpec(
        select_layer=m.vision.select_layer,
        keep_ratio=m.selector.keep_ratio,
        selector_hidden_size=m.selector.hidden_size,
        projector=m.projector.kind,
        num_codes=m.discrete.num_codes,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        label_threshold=m.selector.label_threshold,
    )


def spec_overrides(spec: MavenSpec) -> dict:
    """Settings that do not change weight shapes follow the recipe over a saved model's (e.g. an alpha
    ablation at stage 4)."""
    return {
        "keep_ratio": spec.keep_ratio,
        "select_layer": spec.select_layer,
        "label_threshold": spec.label_threshold,
    }


def model_builder(cfg: Config, source: ModelSource, layout: VocabLayout, spec: MavenSpec):
    """A callable `(copy_fn=None) -> MavenModel`, so a backend can construct it in its own context."""
    attn = resolve_attn_implementation(
        cfg.model.llm.attn_implementation, cfg.stage.dtype, cfg.parallel.backend
    )
    if source.kind == "base":
        return partial(
            MavenModel.from_base,
            source.path,
            source.tower_dir,
            layout,
            spec,
            cfg.seed,
            embed_init=cfg.model.vocab.embed_init,
            attn_implementation=attn,
        )
    return partial(MavenModel.from_pretrained, source.path, spec_overrides(spec), attn_implementation=attn)


def build_engine(
    cfg: Config,
    dims: ParallelDims,
    env: DistEnv,
    source: ModelSource,
    layout: VocabLayout,
    tokenizer,
    total_steps: int,
    accumulation: int,
) -> Engine:
    """World of one: the plain PyTorch engine (ZeRO over one rank shards nothing), unless
    ``parallel.single_process`` asks for ZeRO-3. Otherwise the recipe's backend."""
    spec = model_spec(cfg, tokenizer)
    build = model_builder(cfg, source, layout, spec)
    if cfg.parallel.backend == "3d":
        from maven_dist.parallel.three_d import ThreeDEngine

        # A saved MaVEn directory is streamed shard by shard; base models are built whole first.
        return ThreeDEngine(
            source.path if source.kind == "maven" else build,
            cfg,
            dims,
            total_steps,
            accumulation,
            spec_overrides=spec_overrides(spec),
        )
    if env.world_size > 1 or cfg.parallel.single_process == "zero3":
        from maven_dist.parallel.zero3 import Zero3Engine

        return Zero3Engine(build, cfg, dims, total_steps, accumulation)
    model = build()
    apply_trainable(model, cfg.stage.trainable)
    if cfg.stage.gradient_checkpointing:
        model.enable_activation_checkpointing()
    return LocalEngine(model.to(env.device), cfg.stage, total_steps, accumulation)
