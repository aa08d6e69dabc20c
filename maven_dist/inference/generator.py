"""Prompts and raw images in, text (or visual codes) out: a model directory's processor and model together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maven_dist.inference.processor import ImageInput, InputError, MavenProcessor, Prompt
from maven_dist.model.generation import MavenForConditionalGeneration, resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Generation:
    text: str
    """The answer (text tokens, up to the first end-of-sequence)."""
    token_ids: list[int]
    """Every generated id."""
    codes: list[list[int]] = field(default_factory=list)
    """With ``allow_visual_codes``: each generated ``<img> .. </img>`` block as codes."""


class MavenGenerator:
    """``MavenGenerator.from_pretrained(DIR).generate(prompts, images)``: see ``maven_dist.inference``."""

    def __init__(self, model: MavenForConditionalGeneration, processor: MavenProcessor):
        self.model, self.processor = model, processor
        self.context = model.maven.llm.config.max_position_embeddings

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, device: str | None = None, dtype: str | torch.dtype = "fp32"
    ) -> MavenGenerator:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise InputError(f"{model_dir} is not a directory: give a stage export or a `maven merge` output")
        device = str(resolve_device(device))  # "auto" and None: the GPU where there is one
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        try:
            model = MavenForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, device_map=device)
        except (FileNotFoundError, ValueError) as err:
            raise InputError(f"{model_dir}: {err}") from err
        # The discrete tokenizer runs in fp32 where the model is half precision on CPU (no bf16 kernels).
        discrete_dtype = dtype if str(device).startswith("cuda") else torch.float32
        return cls(model, MavenProcessor.from_pretrained(model_dir, device=device, dtype=discrete_dtype))

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        images: Sequence[Sequence[ImageInput]] | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        num_beams: int = 1,
        stop: Sequence[str] | None = None,
        allow_visual_codes: bool = False,
        views: Sequence[str] | None = None,
        streamer=None,
    ) -> list[Generation]:
        """Answer each prompt. `temperature` 0 decodes greedily (or with `num_beams` beams); above 0 it
        samples with `top_p`. `stop` strings end a generation early. `views`: what each image contributes
        (default: the views the model was trained with, ``config.json: views``)."""
        views = tuple(views) if views is not None else self.processor.views
        batch = self.processor(
            list(prompts), [list(i) for i in images] if images is not None else None, tuple(views)
        )
        for k, positions in enumerate(batch.positions):
            if positions + max_new_tokens > self.context:
                raise InputError(
                    f"prompt {k} takes {positions} positions with its images; with max_new_tokens={max_new_tokens} "
                    f"that exceeds the model's context of {self.context}: shorten it or lower max_new_tokens"
                )
        options = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "streamer": streamer}
        if temperature > 0:
            # top_k=0: only temperature and top_p shape the distribution (transformers defaults top_k to 50)
            options |= {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        else:
            options |= {"do_sample": False}
        if stop:
            options |= {"stop_strings": list(stop), "tokenizer": self.processor.tokenizer}
        out = self.model.generate(
            batch.input_ids,
            batch.attention_mask,
            batch.pixel_values,
            batch.image_codes,
            views=views,
            allow_visual_codes=allow_visual_codes,
            **options,
        )
        results = []
        for row in out:
            ids = row.tolist()
            codes = self.processor.visual_codes(ids) if allow_visual_codes else []
            results.append(Generation(self.processor.decode(ids), ids, codes))
        return results

    @torch.no_grad()
    def loglikelihood(
        self,
        prompts: Sequence[Prompt],
        continuations: Sequence[str],
        images: Sequence[Sequence[ImageInput]] | None = None,
        views: Sequence[str] | None = None,
    ) -> list[tuple[float, bool]]:
        """For each prompt, the summed log-probability of its continuation (tokenised as training tokenises an
        answer) under text-only decoding, and whether greedy decoding would produce exactly that continuation.
        What multiple-choice tasks score options with."""
        if len(continuations) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        views = tuple(views) if views is not None else self.processor.views
        batch = self.processor(
            list(prompts), [list(i) for i in images] if images is not None else None, tuple(views)
        )
        model, device = self.model, self.model.device
        embeds, mask = model.prompt_embeds(
            batch.input_ids.to(device), batch.attention_mask.to(device),
            batch.pixel_values.to(device), batch.image_codes.to(device), views,
        )  # fmt: skip
        targets = [self.processor.tokenizer.encode(c, add_special_tokens=False) for c in continuations]
        if any(not t for t in targets):
            raise InputError("an empty continuation has no likelihood to score")
        width = max(len(t) for t in targets)
        ids = torch.full(
            (len(targets), width), self.processor.tokenizer.eos_token_id, dtype=torch.long, device=device
        )
        cont_mask = torch.zeros_like(ids)
        for row, t in enumerate(targets):
            ids[row, : len(t)] = torch.tensor(t)
            cont_mask[row, : len(t)] = 1
        full_mask = torch.cat([mask, cont_mask], dim=1)
        full = torch.cat([embeds, model.maven.embed_tokens(ids).to(embeds.dtype)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            inputs_embeds=full, attention_mask=full_mask, position_ids=positions, use_cache=False
        ).logits
        start = embeds.shape[1] - 1  # the last prompt position predicts the first continuation token
        scores = logits[:, start : start + width].float()
        scores[..., self.processor.layout.text_size :] = float("-inf")  # text-only, as decoding
        logprobs = torch.log_softmax(scores, dim=-1)
        out = []
        for row, t in enumerate(targets):
            n = len(t)
            picked = logprobs[row, :n].gather(-1, ids[row, :n, None]).squeeze(-1)
            greedy = bool((logprobs[row, :n].argmax(-1) == ids[row, :n]).all())
            out.append((float(picked.sum()), greedy))
        return out
