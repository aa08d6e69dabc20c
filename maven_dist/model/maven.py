"""MavenModel: LLM + unified vocabulary + CLIP tower + patch selector + projector.

The model is written once; parallel backends wrap it (``maven_dist/parallel/``) and stages pick
what trains (``maven_dist/model/parts.py``). Two forward paths, chosen by the stage's loss:

* ``selector_bce`` (stage 1): tower features + h_eos -> selector logits -> BCE on patch labels.
* ``lm`` (stages 2-4): images expanded into discrete and/or continuous tokens -> LLM -> next-token
  cross-entropy on labelled positions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

from maven_dist.config import ConfigError
from maven_dist.contract.atomic_write import atomic_directory
from maven_dist.contract.batch import Batch
from maven_dist.contract.vocab import VocabLayout
from maven_dist.model import hf_layout
from maven_dist.model.frontend import (
    EosStates,
    MavenFrontEnd,
    SequenceInputs,
    eos_input_length,
    h_eos_spread,
    precomputed_eos_states,
)
from maven_dist.model.lm_loss import UnifiedHeadLoss, labelled_rows
from maven_dist.model.packing import packed_hidden_states, unpadded_hidden_states
from maven_dist.model.rope import apply_fp32_rope
from maven_dist.model.selector import selector_bce, selector_metrics
from maven_dist.model.spec import MavenSpec
from maven_dist.model.vocab_init import RowInit, init_new_rows

CopyFn = Callable[[nn.Parameter, torch.Tensor], None]
ConstructContext = Callable[[], contextlib.AbstractContextManager]
"""Where the modules are constructed, e.g. ``deepspeed.zero.Init`` (parameters partitioned as they are
made). Only construction runs in it: weights are read and new rows drawn after it (see ``from_base``)."""


@dataclass
class ModelOutput:
    loss: torch.Tensor
    """The scalar that backward runs on."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached values to log, keys namespaced (`loss/...`, `selector/...`, `model/...`)."""
    num_tokens: int = 0
    """Labelled target tokens (or labelled patches in stage 1) in this micro-batch."""
    num_input_tokens: int = 0
    """Sequence positions the LLM processed (throughput and MFU)."""


class NewVocabRows(nn.Module):
    """The unified vocabulary's new rows (specials, codes, padding) as parameters of their own.

    Each is a module so ZeRO-3 gathers it through its own forward hooks.
    """

    def __init__(self, num_rows: int, hidden_size: int):
        super().__init__()
        self.embed = nn.Embedding(num_rows, hidden_size)
        self.head = nn.Linear(hidden_size, num_rows, bias=False)


class MavenModel(MavenFrontEnd):
    """The LLM with the unified vocabulary behind the MaVEn front end (``maven_dist/model/frontend.py``)."""

    def __init__(self, llm: nn.Module, tower: CLIPVisionModel, layout: VocabLayout, spec: MavenSpec):
        if getattr(llm.config, "tie_word_embeddings", False):
            raise ValueError(
                "LLMs with tied input/output embeddings are not supported (Vicuna/LLaMA-2 are untied)"
            )
        if llm.get_input_embeddings().num_embeddings != layout.text_size:
            raise ValueError(
                f"LLM has {llm.get_input_embeddings().num_embeddings} embedding rows but the vocabulary "
                f"layout expects {layout.text_size} text rows"
            )
        hidden = llm.config.hidden_size
        super().__init__(tower, layout, spec, hidden)
        self.llm = llm
        self.vocab_new_rows = NewVocabRows(layout.num_new_rows, hidden)
        self.lm_loss = UnifiedHeadLoss()
        self.image_processor_config: dict | None = None

    def text_embedding(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def new_row_embedding(self) -> nn.Module:
        return self.vocab_new_rows.embed

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_configs(
        cls,
        llm_config,
        tower_config: CLIPVisionConfig,
        layout: VocabLayout,
        spec: MavenSpec,
        init_weights: bool = True,
        attn_implementation: str = "sdpa",
    ) -> MavenModel:
        """A model of the given shapes. With `init_weights=False` the LLM and tower are left uninitialised
        (their weights are loaded next): faster, and required under ZeRO-3's partitioned construction,
        where HF's post-init would index into empty parameter shards. `attn_implementation` is the
        LLM's attention kernel (``model.llm.attn_implementation``)."""
        if attn_implementation == "auto":  # a recipe's value reaching here unresolved: its GPU default
            attn_implementation = resolve_attn_implementation("auto", "bf16", "zero3")
        check_attn_implementation(attn_implementation)
        llm_config = _with_vocab_size(llm_config, layout.text_size)
        with maybe_skip_hf_init(not init_weights):
            # torch's default dtype: fp32, unless the caller builds in another (``built_as``).
            llm = AutoModelForCausalLM.from_config(
                llm_config, dtype=torch.get_default_dtype(), attn_implementation=attn_implementation
            )
            tower = CLIPVisionModel(tower_config)
        return cls(llm, tower, layout, spec)

    @classmethod
    def from_base(
        cls,
        llm_dir: Path,
        tower_dir: Path,
        layout: VocabLayout,
        spec: MavenSpec,
        seed: int = 0,
        copy_fn: CopyFn | None = None,
        embed_init: RowInit = "text_distribution",
        attn_implementation: str = "sdpa",
        construct: ConstructContext = contextlib.nullcontext,
    ) -> MavenModel:
        """The first stage's start: base LLM and CLIP tower from local HF directories; the new vocabulary
        rows drawn from a Gaussian fitted to the text rows (input rows per `embed_init`, head rows at
        the mean: ``maven_dist/model/vocab_init.py``); selector and projector freshly initialised.

        The modules are built inside `construct()`; everything else runs after it, through `copy_fn`.
        ``deepspeed.zero.Init`` replaces torch's tensor constructors while it is active (device and dtype
        forced: ``partition_parameters.py:zero_wrapper_for_fp_tensor_constructor``): a CPU generator's
        ``randn`` fails on CUDA, ``torch.load`` rebuilds a file's fp16 storages as bf16 tensors, RoPE's
        fp32 ``arange`` turns bf16. Reading files and drawing rows outside it avoids all three."""
        torch.manual_seed(seed)
        with construct():
            model = cls.from_configs(
                AutoConfig.from_pretrained(llm_dir),
                CLIPVisionConfig.from_pretrained(tower_dir),
                layout,
                spec,
                init_weights=False,
                attn_implementation=attn_implementation,
            )
        apply_fp32_rope(model)
        copy = copy_fn or copy_param
        text_rows: dict[str, torch.Tensor] = {}

        def copy_and_keep_text_rows(param: nn.Parameter, value: torch.Tensor) -> None:
            # Keep the text rows as read from disk: under ZeRO-3 the parameters are partitioned.
            if param is model.llm.get_input_embeddings().weight:
                text_rows["embed"] = value
            elif param is model.llm.get_output_embeddings().weight:
                text_rows["head"] = value
            copy(param, value)

        loaded = model._load_component(hf_layout.LLM_DIR, Path(llm_dir), copy_and_keep_text_rows)
        loaded |= model._load_component(hf_layout.TOWER_DIR, Path(tower_dir), copy)
        generator = torch.Generator().manual_seed(seed)
        rows = model.vocab_new_rows
        for part, module, kind in (("embed", rows.embed, embed_init), ("head", rows.head, "mean")):
            copy(module.weight, init_new_rows(text_rows[part], layout.num_new_rows, kind, generator))
        loaded |= {"vocab_new_rows.embed.weight", "vocab_new_rows.head.weight"}
        expected = {
            n
            for n, _ in model.named_parameters()
            if n.startswith(("llm.", "vision_tower.", "vocab_new_rows."))
        }
        _check_complete(expected, loaded, f"base models {llm_dir} and {tower_dir}")
        model.image_processor_config = _read_processor_config(Path(tower_dir))
        return model

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        spec_overrides: dict | None = None,
        copy_fn: CopyFn | None = None,
        attn_implementation: str = "sdpa",
        construct: ConstructContext = contextlib.nullcontext,
    ) -> MavenModel:
        """Load a saved MaVEn directory (see ``hf_layout``). `spec_overrides` may change settings that
        do not affect weight shapes (keep_ratio, select_layer, label_threshold). `construct` and
        `copy_fn` as in :meth:`from_base`."""
        directory = Path(directory)
        cfg = hf_layout.read_maven_config(directory)
        spec = MavenSpec(**(cfg["spec"] | (spec_overrides or {})))
        layout = VocabLayout(**cfg["vocab"])
        with construct():
            model = cls.from_configs(
                AutoConfig.from_pretrained(directory / hf_layout.LLM_DIR),
                CLIPVisionConfig.from_pretrained(directory / hf_layout.TOWER_DIR),
                layout,
                spec,
                init_weights=False,
                attn_implementation=attn_implementation,
            )
        apply_fp32_rope(model)
        copy = copy_fn or copy_param
        loaded = set()
        for component in (hf_layout.LLM_DIR, hf_layout.TOWER_DIR):
            loaded |= model._load_component(component, directory / component, copy)
        loaded |= model._load_component(
            hf_layout.MAVEN_MODULES_FILE, directory / hf_layout.MAVEN_MODULES_FILE, copy
        )
        _check_complete({n for n, _ in model.named_parameters()}, loaded, str(directory))
        model.image_processor_config = _read_processor_config(directory / hf_layout.TOWER_DIR)
        return model

    def _load_component(self, component: str, path: Path, copy: CopyFn) -> set[str]:
        params = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        if component == hf_layout.MAVEN_MODULES_FILE:
            tensors = hf_layout.iter_safetensors([path])
        else:
            tensors = hf_layout.iter_checkpoint_tensors(path)
        loaded = set()
        for key, tensor in tensors:
            for name, value in hf_layout.from_hf_layout(component, key, tensor, self.layout).items():
                target = params.get(name)
                if target is None:
                    if name in buffers:  # e.g. rotary inv_freq or CLIP position_ids: recomputed, not loaded
                        continue
                    raise ValueError(f"{path}: tensor {key!r} matches no parameter of the model ({name})")
                copy(target, value)
                loaded.add(name)
        return loaded

    # ------------------------------------------------------------------ saving

    def enable_activation_checkpointing(self) -> None:
        """Recompute the LLM's decoder activations in backward (non-reentrant: works with frozen inputs and
        ZeRO-3's hooks). transformers 5 renamed the call; older versions have only the old name."""
        llm = self.llm
        if hasattr(llm, "activation_checkpointing_enable"):
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def save_pretrained(
        self,
        out_dir: str | Path,
        tokenizer=None,
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_size: str | int = "5GB",
        template: str | None = None,
        discrete: hf_layout.DiscreteTokenizerFiles | None = None,
        views: Sequence[str] | None = None,
    ) -> Path:
        """Write the HF layout atomically (a temporary sibling directory renamed into place).

        `state_dict` lets a parallel backend pass gathered full tensors (ZeRO-3 keeps only shards);
        `template`, `discrete` and `views` are recorded for inference (see :meth:`save_skeleton`)."""
        from huggingface_hub import save_torch_state_dict

        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as tmp:
            self.save_skeleton(tmp, tokenizer, template, discrete, views)
            parts = hf_layout.to_hf_layout(state_dict if state_dict is not None else self.state_dict())
            for component in (hf_layout.LLM_DIR, hf_layout.TOWER_DIR):
                save_torch_state_dict(parts[component], tmp / component, max_shard_size=max_shard_size)
            modules = {k: v.contiguous() for k, v in parts[hf_layout.MAVEN_MODULES_FILE].items()}
            save_file(modules, tmp / hf_layout.MAVEN_MODULES_FILE)
        return out_dir

    def save_skeleton(
        self,
        out_dir: str | Path,
        tokenizer=None,
        template: str | None = None,
        discrete: hf_layout.DiscreteTokenizerFiles | None = None,
        views: Sequence[str] | None = None,
    ) -> Path:
        """Everything of the HF layout except the weights: configs, image processor, tokenizer, the chat
        `template` the model is trained with, its `discrete` tokenizer (copied or referenced) and the
        `views` each image contributes in the stage that trained it (inference uses the same).

        Checkpoints carry it, so ``maven merge`` can rebuild a runnable model from shards alone."""
        out_dir = Path(out_dir)
        llm_dir, tower_dir = out_dir / hf_layout.LLM_DIR, out_dir / hf_layout.TOWER_DIR
        llm_dir.mkdir(parents=True, exist_ok=True)
        tower_dir.mkdir(exist_ok=True)
        _with_vocab_size(self.llm.config, self.layout.padded_size).save_pretrained(llm_dir)
        self.vision_tower.tower.config.save_pretrained(tower_dir)
        if self.image_processor_config is not None:
            (tower_dir / "preprocessor_config.json").write_text(
                json.dumps(self.image_processor_config, indent=2)
            )
        config = {"model_type": "maven", "spec": asdict(self.spec), "vocab": self.layout.to_dict()}
        if template is not None:
            config["template"] = template
        if views is not None:
            config["views"] = list(views)
        if discrete is not None:
            config["discrete_tokenizer"] = hf_layout.attach_discrete_tokenizer(out_dir, discrete)
        (out_dir / hf_layout.CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
            tokenizer.save_pretrained(llm_dir)
        return out_dir

    # ------------------------------------------------------------------ pieces of the forward

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Unified-vocabulary output head: [*, d] -> [*, padded_size]."""
        return torch.cat([self.llm.get_output_embeddings()(hidden), self.vocab_new_rows.head(hidden)], dim=-1)

    @torch.no_grad()
    def eos_states(self, image_codes: torch.Tensor) -> torch.Tensor:
        """h_eos [N, d]: the LLM's last-layer (final-norm) state at the end of each image's h_eos input
        (``MavenFrontEnd.eos_input_ids``). One gradient-free pass batched over all images (paper §3.2)."""
        embeds = self.embed_tokens(self.eos_input_ids(image_codes))
        return self.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_codes: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """Decode from prompts with ``<image>`` placeholders and their images (new token ids [B, n]); see
        ``maven_dist/model/generation.py`` for the options, and ``maven_dist.inference`` for text and raw
        images in, text out."""
        from maven_dist.model.generation import MavenForConditionalGeneration

        return MavenForConditionalGeneration.wrap(self).generate(
            input_ids, attention_mask, pixel_values, image_codes, **kwargs
        )

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        batch: Batch | None = None,
        views: Sequence[str] = ("discrete", "continuous"),
        loss: str = "lm",
        h_eos: torch.Tensor | None = None,
        eos_codes: torch.Tensor | None = None,
    ) -> ModelOutput | torch.Tensor:
        """The stage's loss on `batch`. `h_eos`: its images' h_eos computed beforehand (the engines: one pass
        per step, or a frozen stage's cache: ``maven_dist/parallel/h_eos.py``); None runs the pass here.
        `eos_codes` alone: only the h_eos pass over those image codes (what the engines run through
        DeepSpeed's forward, so ZeRO-3 gathers for it as for any forward)."""
        if eos_codes is not None:
            return self.eos_states(eos_codes)
        eos_states = self.eos_states if h_eos is None else precomputed_eos_states(h_eos)
        if loss == "selector_bce":
            return self.selector_forward(batch, eos_states)
        return self.lm_forward(batch, views, eos_states)

    def selector_forward(self, batch: Batch, eos_states: EosStates | None = None) -> ModelOutput:
        if batch.patch_labels is None:
            raise ValueError(
                f"stage-1 batch without patch labels (samples {batch.sample_ids[:4]}): run maven labels"
            )
        features = self.vision_tower(batch.pixel_values)
        h_eos = (eos_states or self.eos_states)(batch.image_codes)
        logits = self.selector(features, h_eos)
        loss = selector_bce(logits, batch.patch_labels)
        metrics = {"loss/selector_bce": loss.detach()}
        metrics |= selector_metrics(logits, batch.patch_labels, self.spec.label_threshold, self.num_kept)
        metrics |= _spread_metric(h_eos)
        return ModelOutput(
            loss,
            metrics,
            num_tokens=batch.patch_labels.numel(),
            num_input_tokens=batch.num_images * eos_input_length(self.spec),
        )

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unified head's weight matrices in vocabulary order: the LLM's text rows, the new rows."""
        return self.llm.get_output_embeddings().weight, self.vocab_new_rows.head.weight

    def lm_hidden(
        self, batch: Batch, views: Sequence[str], eos_states: EosStates | None = None
    ) -> tuple[torch.Tensor, SequenceInputs]:
        """The LLM's last-layer (final-norm) states [B, T, d] of the assembled batch, and its inputs.
        Packed rows run with per-sample positions and attention, padded rows under flash-attn on their
        real tokens only (``maven_dist/model/packing.py``)."""
        inputs = self.sequence_inputs(batch, views, eos_states or self.eos_states)
        attn = self.llm.config._attn_implementation
        if inputs.segment_ids is not None:
            return packed_hidden_states(self.llm.model, inputs.embeds, inputs.segment_ids, attn), inputs
        if attn == "flash_attention_2":  # unpadded once here, not in every layer (issue 23, finding 5)
            return unpadded_hidden_states(self.llm.model, inputs.embeds, inputs.attention_mask), inputs
        hidden = self.llm.model(
            inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask, use_cache=False
        ).last_hidden_state
        return hidden, inputs

    def lm_forward(
        self, batch: Batch, views: Sequence[str], eos_states: EosStates | None = None
    ) -> ModelOutput:
        hidden, inputs = self.lm_hidden(batch, views, eos_states)
        # Only labelled positions reach the head, a chunk at a time (``maven_dist/model/lm_loss.py``).
        rows, targets = labelled_rows(hidden, inputs.labels)
        token_loss = self.lm_loss(rows, targets, self.head_weights)
        num_tokens = targets.shape[0]
        loss = token_loss.sum() / max(num_tokens, 1)
        per_image = self.visual_tokens_per_image(views)
        metrics = {"loss/lm": loss.detach(), "model/visual_tokens_per_image": torch.tensor(float(per_image))}
        is_visual = targets >= self.layout.text_size
        for name, sel in (("lm_text", ~is_visual), ("lm_visual_codes", is_visual)):
            if sel.any():
                metrics[f"loss/{name}"] = token_loss[sel].mean().detach()
        metrics |= _spread_metric(inputs.h_eos)
        return ModelOutput(
            loss, metrics, num_tokens=num_tokens, num_input_tokens=int(inputs.attention_mask.sum())
        )


def _spread_metric(h_eos: torch.Tensor | None) -> dict[str, torch.Tensor]:
    spread = h_eos_spread(h_eos)
    return {} if spread is None else {"selector/h_eos_spread": spread}


# ---------------------------------------------------------------------- helpers


@contextlib.contextmanager
def maybe_skip_hf_init(skip: bool):
    """Construct HF models without initialising their weights when `skip` (they are loaded next)."""
    if not skip:
        yield
        return
    from transformers.initialization import no_init_weights

    with no_init_weights():
        yield


@contextlib.contextmanager
def built_as(dtype: torch.dtype, device: str | torch.device):
    """Construct modules in `dtype` on `device` (a ``construct`` context for ``from_pretrained``): a bf16 model
    for a GPU is never built in fp32 on the host first (28 GB at 7B). RoPE's buffers stay fp32
    (transformers computes them with an explicit dtype; ``apply_fp32_rope`` runs after construction anyway)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def resolve_attn_implementation(name: str, dtype: str, backend: str) -> str:
    """``model.llm.attn_implementation`` as the model is built: ``auto`` (the GPU recipes' value) is
    ``flash_attention_2`` where it can run (a CUDA device, the flash-attn package, bf16, not the 3D decoder,
    which has no flash path), else ``sdpa``; any other value as it is."""
    if name != "auto":
        return name
    usable = (
        torch.cuda.is_available()
        and importlib.util.find_spec("flash_attn") is not None
        and dtype == "bf16"
        and backend != "3d"
    )
    return "flash_attention_2" if usable else "sdpa"


def check_attn_implementation(name: str) -> None:
    """Refuse an attention kernel this machine cannot run, before any weights are read."""
    key = f"model.llm.attn_implementation={name}"
    if name not in ("sdpa", "eager", "flash_attention_2"):
        raise ConfigError(f"{key} is not allowed; choose one of sdpa, eager, flash_attention_2, auto")
    if name != "flash_attention_2":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"{key} needs a CUDA device and none is visible; use sdpa (the default) here")
    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            f"{key} needs the flash-attn package, which is not installed "
            "(pip install flash-attn --no-build-isolation); or use sdpa (the default)"
        )


def _with_vocab_size(config, vocab_size: int):
    config = config.__class__.from_dict(config.to_dict())
    config.vocab_size = vocab_size
    return config


def copy_param(param: nn.Parameter, value: torch.Tensor) -> None:
    """Copy a saved tensor into a parameter, checking the shape."""
    if param.shape != value.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs saved {tuple(value.shape)}")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _check_complete(expected: set[str], loaded: set[str], where: str) -> None:
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} parameters, e.g. {missing[:5]}")


def _read_processor_config(tower_dir: Path) -> dict | None:
    path = tower_dir / "preprocessor_config.json"
    return json.loads(path.read_text()) if path.is_file() else None
