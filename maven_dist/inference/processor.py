"""Text and raw images -> the tensors a MaVEn generates from, exactly as training prepared them.

Everything comes from the model directory: the tokenizer (with the unified vocabulary), the chat template
the model was trained with (``config.json: template``), the tower's image transform
(``vision_tower/preprocessor_config.json``) and the discrete tokenizer that produced the training codes
(``config.json: discrete_tokenizer``, checked by hash). Images go through the training path: decoded and
converted to RGB as ``maven prepare`` does, letterboxed and resized by the same ``ImageTransform``, and
tokenised into codes by the same tokenizer ``maven tokenize`` ran (``tests/unit/test_inference.py`` checks
both against the shards).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from maven_dist.contract.lengths import visual_tokens_per_image
from maven_dist.contract.vocab import IMAGE_PLACEHOLDER, VocabLayout
from maven_dist.data.image_transform import ImageTransform
from maven_dist.data.images import RecordRejected, load_image
from maven_dist.data.templates import ConversationError, render_prompt
from maven_dist.data.tokenizer import load_text_tokenizer
from maven_dist.model import hf_layout
from maven_dist.offline.discrete import DiscreteTokenizer, load_discrete_tokenizer

Prompt = str | list[dict]
"""A question (``<image>`` marks where each image goes), or a conversation: LLaVA turns
(``{"from": "human"|"gpt", "value": ...}``) or chat messages (``{"role": "user"|"assistant", "content": ...}``)
ending with the question to answer."""

ImageInput = str | Path | Image.Image


class InputError(ValueError):
    """A prompt, image or model directory that cannot be used; the message says which and why."""


@dataclass
class PromptBatch:
    """Left-padded prompts with image placeholders and their images, ready for ``generate``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_codes: torch.Tensor
    positions: list[int]
    """Sequence positions of each prompt once every image is expanded (what the context must hold)."""


class MavenProcessor:
    """Turns prompts and images into a :class:`PromptBatch`, and generated ids back into text."""

    def __init__(
        self,
        tokenizer,
        template: str,
        transform: ImageTransform,
        discrete: DiscreteTokenizer,
        layout: VocabLayout,
        num_codes: int,
        num_patches: int,
        keep_ratio: float,
        views: tuple[str, ...] = ("discrete", "continuous"),
    ):
        self.views = tuple(views)
        """The views each image contributes, as the model was trained (``config.json: views``)."""
        self.tokenizer, self.template, self.transform, self.discrete = (
            tokenizer,
            template,
            transform,
            discrete,
        )
        self.layout, self.num_codes, self.num_patches, self.keep_ratio = (
            layout,
            num_codes,
            num_patches,
            keep_ratio,
        )

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> MavenProcessor:
        model_dir = Path(model_dir)
        try:
            saved = hf_layout.read_maven_config(model_dir)
            files = hf_layout.discrete_tokenizer_files(model_dir)
        except (FileNotFoundError, ValueError) as err:
            raise InputError(str(err)) from err
        tower_dir = model_dir / hf_layout.TOWER_DIR
        discrete = load_discrete_tokenizer(
            files.kind,
            files.path,
            eva_path=files.eva_path,
            tower_path=tower_dir,
            device=str(device),
            dtype=dtype,
        )
        transform = ImageTransform.from_pretrained(tower_dir)
        spec = saved["spec"]
        grid = transform.image_size // _patch_size(tower_dir)
        return cls(
            load_text_tokenizer(model_dir),
            saved.get("template", "vicuna_v1"),
            transform,
            discrete,
            VocabLayout(**saved["vocab"]),
            spec["num_codes"],
            grid * grid,
            spec["keep_ratio"],
            tuple(saved.get("views", ("discrete", "continuous"))),
        )

    # ------------------------------------------------------------------ in

    def __call__(
        self,
        prompts: list[Prompt],
        images: list[list[ImageInput]] | None = None,
        views: tuple[str, ...] | None = None,
    ) -> PromptBatch:
        views = self.views if views is None else views
        images = images if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise InputError(
                f"{len(prompts)} prompts but {len(images)} image lists: give one list per prompt"
            )
        rows, decoded = [], []
        per_image = visual_tokens_per_image(self.num_codes, self.num_patches, self.keep_ratio, views)
        for k, (prompt, paths) in enumerate(zip(prompts, images, strict=True)):
            turns = _as_turns(prompt, len(paths), k)
            try:
                ids = render_prompt(turns, self.template, self.tokenizer)
            except ConversationError as err:
                raise InputError(f"prompt {k}: {err}") from err
            rows.append(ids)
            decoded += [self._image(p, k) for p in paths]
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for b, ids in enumerate(rows):  # left padding: every prompt ends at the last position
            input_ids[b, width - len(ids) :] = torch.tensor(ids)
            attention_mask[b, width - len(ids) :] = 1
        size = self.transform.image_size
        if decoded:
            pixel_values = torch.stack([self.transform(image) for image in decoded])
            image_codes = self.discrete.encode(decoded).long().cpu()
        else:
            pixel_values = torch.zeros(0, 3, size, size)
            image_codes = torch.zeros(0, self.num_codes, dtype=torch.long)
        positions = [len(ids) + len(paths) * (per_image - 1) for ids, paths in zip(rows, images, strict=True)]
        return PromptBatch(input_ids, attention_mask, pixel_values, image_codes, positions)

    def _image(self, image: ImageInput, prompt: int) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        try:
            rgb, _, _ = load_image(Path(image))
        except RecordRejected as err:
            raise InputError(f"prompt {prompt}: {err} ({err.reason})") from err
        return rgb

    # ------------------------------------------------------------------ out

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Text of generated ids (text rows only; stops at the first end-of-sequence)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(self.tokenizer.eos_token_id)]
        return self.tokenizer.decode([i for i in ids if i < self.layout.text_size], skip_special_tokens=True)

    def visual_codes(self, ids: torch.Tensor | list[int]) -> list[list[int]]:
        """Every ``<img> c_1 .. </img>`` block of generated ids, as codes in [0, codebook)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        blocks, current = [], None
        for i in ids:
            if i == self.layout.img_start_id:
                current = []
            elif i == self.layout.img_end_id and current is not None:
                blocks.append(current)
                current = None
            elif (
                current is not None
                and self.layout.code_offset <= i < self.layout.code_offset + self.layout.codebook_size
            ):
                current.append(i - self.layout.code_offset)
        if current:  # an unfinished block (max_new_tokens reached) still says what was generated
            blocks.append(current)
        return blocks


def _as_turns(prompt: Prompt, num_images: int, index: int) -> list[dict]:
    """LLaVA turns ending with the question; one ``<image>`` per image (prepended when none is written)."""
    if isinstance(prompt, str):
        turns = [{"from": "human", "value": prompt}]
    elif isinstance(prompt, list) and all(isinstance(t, dict) for t in prompt):
        roles = {"user": "human", "assistant": "gpt", "human": "human", "gpt": "gpt"}
        turns = []
        for t in prompt:
            role, value = t.get("role", t.get("from")), t.get("content", t.get("value"))
            if role not in roles or not isinstance(value, str):
                raise InputError(
                    f"prompt {index}: turn {t!r} needs a role user/assistant and a string content"
                )
            turns.append({"from": roles[role], "value": value})
    else:
        raise InputError(f"prompt {index} is {type(prompt).__name__}: give a string or a list of turns")
    written = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if written == 0 and num_images:
        # LLaVA's convention for a question without placeholders: the images come first.
        turns[0] = turns[0] | {"value": (IMAGE_PLACEHOLDER + "\n") * num_images + turns[0]["value"]}
    elif written != num_images:
        raise InputError(
            f"prompt {index} has {written} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) were "
            f"given: give one image per {IMAGE_PLACEHOLDER} (or no placeholder, and the images go first)"
        )
    return turns


def _patch_size(tower_dir: Path) -> int:
    import json

    return int(json.loads((tower_dir / "config.json").read_text())["patch_size"])
