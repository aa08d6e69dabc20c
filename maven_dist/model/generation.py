"""Running a trained MaVEn: transformers' generation over the unified vocabulary, with a KV cache.

:class:`MavenForConditionalGeneration` wraps a :class:`MavenModel` as a transformers ``PreTrainedModel``
with ``GenerationMixin``, so ``generate`` brings greedy, sampling (temperature, top-p), beam search,
stop strings, streaming and the KV cache. The prompt is assembled once by the MaVEn front end (discrete
block + selected, projected patches per image, exactly as in training, left-padded) and handed to
``generate`` as ``inputs_embeds``; every decoded token is embedded through the unified vocabulary and
scored by the unified head (text rows and new rows), with the LLM's own cache (``DynamicCache``).

Decoding emits text tokens only by default: every row from the first new row on (``<img>``, ``</img>``,
the visual codes, padding) gets -inf before the decoding rule picks a token. ``allow_visual_codes``
also opens ``<img>``, ``</img>`` and the codes (stage 2's text -> image-code task), never the padding.

``MavenConfig`` is what ``AutoConfig`` reads from a MaVEn directory's ``config.json``; ``maven_dist``
registers both classes with transformers' Auto classes (``maven_dist/__init__.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import CausalLMOutputWithPast

from maven_dist.contract.batch import Batch
from maven_dist.contract.vocab import VocabLayout
from maven_dist.model import hf_layout

if TYPE_CHECKING:  # imported where used: maven.py imports this module (a cycle at import time otherwise)
    from maven_dist.model.maven import MavenModel

DEFAULT_VIEWS = ("discrete", "continuous")


class MavenConfig(PretrainedConfig):
    """A MaVEn directory's ``config.json``: the spec, the vocabulary layout and the chat template, with the
    LLM's config as ``text_config`` (what transformers' generation sizes its cache by)."""

    model_type = "maven"

    def __init__(
        self,
        spec: dict | None = None,
        vocab: dict | None = None,
        template: str | None = None,
        text_config: PretrainedConfig | dict | None = None,
        **kwargs,
    ):
        self.spec = dict(spec or {})
        self.vocab = dict(vocab or {})
        self.template = template
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        super().__init__(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> MavenConfig:
        directory = Path(pretrained_model_name_or_path)
        saved = hf_layout.read_maven_config(directory)
        text_config = AutoConfig.from_pretrained(directory / hf_layout.LLM_DIR)
        known = {k: saved[k] for k in ("spec", "vocab", "template") if k in saved}
        return cls(**known, text_config=text_config)


class VocabularyMask(LogitsProcessor):
    """-inf for every id decoding must not produce (see the module doc)."""

    def __init__(self, layout: VocabLayout, allow_visual_codes: bool):
        self.first_banned = layout.text_size
        self.allowed_new = range(0)
        if allow_visual_codes:
            self.allowed_new = range(layout.img_start_id, layout.code_offset + layout.codebook_size)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        banned = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        banned[self.first_banned :] = True
        if len(self.allowed_new):
            banned[self.allowed_new.start : self.allowed_new.stop] = False
        return scores.masked_fill(banned, float("-inf"))


class _UnifiedEmbedding(nn.Module):
    """``get_input_embeddings()`` for transformers: the front end's unified lookup (holds no parameters of
    its own, so the model's parameters are not registered twice)."""

    def __init__(self, maven: MavenModel):
        super().__init__()
        self.__dict__["_maven"] = maven  # not a submodule

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._maven.embed_tokens(ids)


def resolve_device(device_map: str | torch.device | None) -> torch.device:
    """One device for the whole model: `device_map` as given, ``auto`` (or None) the first GPU where there is
    one, else the CPU. A model split over devices is not supported (7B and 13B fit one GPU in bf16)."""
    if isinstance(device_map, dict):
        raise ValueError(
            "a device_map dict is not supported: MaVEn loads onto one device (cuda, cuda:1, cpu)"
        )
    if device_map in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)


class MavenForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """A :class:`MavenModel` as a transformers generation model (see the module doc)."""

    config_class = MavenConfig
    base_model_prefix = "maven"
    main_input_name = "input_ids"
    _supports_cache_class = True
    _tied_weights_keys: dict = {}

    def __init__(self, config: MavenConfig, maven: MavenModel | None = None):
        super().__init__(config)
        if maven is None:
            raise ValueError(
                "MavenForConditionalGeneration is built from a saved MaVEn directory: use "
                "MavenForConditionalGeneration.from_pretrained(DIR) (or AutoModel.from_pretrained(DIR))"
            )
        self.maven = maven
        self.generation_config.pad_token_id = maven.spec.eos_token_id
        self.generation_config.eos_token_id = maven.spec.eos_token_id
        self.generation_config.bos_token_id = maven.spec.bos_token_id

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *args,
        dtype: torch.dtype | str | None = None,
        device_map: str | torch.device | None = None,
        **kwargs,
    ) -> MavenForConditionalGeneration:
        """Load a MaVEn directory (a stage export or a ``maven merge`` output). `dtype` (or the older
        ``torch_dtype``) and a single-device `device_map` are honoured; other transformers options are not."""
        from maven_dist.model.maven import MavenModel, built_as

        dtype = dtype if dtype is not None else kwargs.pop("torch_dtype", None)
        if isinstance(dtype, str):
            dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
        device = resolve_device(device_map)
        directory = Path(pretrained_model_name_or_path)
        # Built in its dtype on its device, the weights streamed in one tensor at a time: never an fp32 copy
        # of the whole model on the host first, and no .to(dtype) that would cast RoPE's buffers too.
        maven = MavenModel.from_pretrained(
            directory, construct=lambda: built_as(dtype or torch.float32, device)
        )
        return cls(MavenConfig.from_pretrained(directory), maven).eval()

    @classmethod
    def wrap(cls, maven: MavenModel) -> MavenForConditionalGeneration:
        """Wrap a model in memory (no directory): its spec and layout make the config."""
        from dataclasses import asdict

        config = MavenConfig(
            spec=asdict(maven.spec), vocab=maven.layout.to_dict(), text_config=maven.llm.config
        )
        return cls(config, maven).eval()

    def save_pretrained(self, save_directory, *args, tokenizer=None, **kwargs) -> Path:  # noqa: D102
        return self.maven.save_pretrained(save_directory, tokenizer)

    def get_input_embeddings(self) -> nn.Module:
        return _UnifiedEmbedding(self.maven)

    def get_output_embeddings(self) -> None:
        return None

    def _init_weights(self, module: nn.Module) -> None:
        """Weights come from the MaVEn directory; transformers must not re-initialise anything."""

    # ------------------------------------------------------------------ the prompt

    def prompt_embeds(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_codes: torch.Tensor,
        views: Sequence[str] = DEFAULT_VIEWS,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts with ``<image>`` placeholders (any padding side) -> left-padded input embeddings and mask,
        assembled by the front end exactly as in training."""
        batch = Batch(pixel_values, image_codes, input_ids, None, attention_mask)
        with torch.no_grad():
            inputs = self.maven.sequence_inputs(batch, views, self.maven.eos_states, padding_side="left")
        return inputs.embeds, inputs.attention_mask

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_codes: torch.Tensor | None = None,
        views: Sequence[str] = DEFAULT_VIEWS,
        allow_visual_codes: bool = False,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """Generate from prompts with images (see the module doc); returns the new token ids only [B, n]
        (beam search: the best beam). Other keyword arguments are transformers' ``generate`` options:
        ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``num_beams``, ``stop_strings``
        (with ``tokenizer=``), ``streamer``, ``use_cache``, ..."""
        if "inputs_embeds" not in kwargs:
            if input_ids is None:
                raise ValueError(
                    "generate needs input_ids (prompts with <image> placeholders) or inputs_embeds"
                )
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            if pixel_values is None:
                pixel_values = torch.zeros(0, 3, 1, 1)
                image_codes = torch.zeros(0, self.maven.spec.num_codes, dtype=torch.long)
            device = self.device
            embeds, attention_mask = self.prompt_embeds(
                input_ids.to(device),
                attention_mask.to(device),
                pixel_values.to(device),
                image_codes.to(device),
                views,
            )
            kwargs["inputs_embeds"] = embeds.to(self.dtype)
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(VocabularyMask(self.maven.layout, allow_visual_codes))
        if kwargs.pop("use_cache", True) is False:
            # transformers always caches when it starts from inputs_embeds; recompute here instead.
            unsupported = sorted(
                k for k in kwargs if k not in ("inputs_embeds", "max_new_tokens", "do_sample")
            )
            if kwargs.get("do_sample") or unsupported:
                raise ValueError(
                    f"use_cache=False decodes greedily only; drop {unsupported or ['do_sample']}"
                )
            return self.greedy_without_cache(
                kwargs["inputs_embeds"], attention_mask, processors, kwargs.get("max_new_tokens", 20)
            )
        return super().generate(attention_mask=attention_mask, logits_processor=processors, **kwargs)

    @torch.no_grad()
    def greedy_without_cache(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor, processors: LogitsProcessorList, steps: int
    ) -> torch.LongTensor:
        """Greedy decoding that recomputes the whole sequence at every step (no KV cache): the reference the
        cached path is tested and benchmarked against. Stops early when every row has produced EOS."""
        eos = self.maven.spec.eos_token_id
        out: list[torch.Tensor] = []
        done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
        for _ in range(steps):
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = self(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=False
            ).logits
            ids = torch.cat(out, dim=1) if out else embeds.new_zeros(embeds.shape[0], 0, dtype=torch.long)
            token = processors(ids, logits[:, -1]).argmax(-1)
            token = torch.where(done, torch.full_like(token, eos), token)
            out.append(token[:, None])
            done |= token == eos
            if done.all():
                break
            embeds = torch.cat([embeds, self.maven.embed_tokens(token)[:, None].to(embeds.dtype)], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        return torch.cat(out, dim=1)

    # ------------------------------------------------------------------ one decoder pass

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Unified-vocabulary logits of the positions given, continuing `cache` when there is one."""
        if "past_key_values" in kwargs:  # transformers' older name for the cache
            cache = kwargs.pop("past_key_values")
        if inputs_embeds is None:
            inputs_embeds = self.maven.embed_tokens(input_ids)
        out = self.maven.llm.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if use_cache is not False else None,  # the LLM would extend a cache it is given
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.maven.logits(hidden).float()
        return CausalLMOutputWithPast(logits=logits, cache=out.cache)


def register_auto_classes() -> None:
    """``AutoConfig`` / ``AutoModel`` / ``AutoModelForImageTextToText`` know model type ``maven``."""
    from transformers import AutoModel, AutoModelForImageTextToText

    AutoConfig.register(MavenConfig.model_type, MavenConfig, exist_ok=True)
    for auto in (AutoModel, AutoModelForImageTextToText):
        auto.register(MavenConfig, MavenForConditionalGeneration, exist_ok=True)
