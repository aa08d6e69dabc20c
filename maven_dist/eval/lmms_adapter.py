"""MaVEn as an lmms-eval model: ``lmms-eval --model maven --model_args pretrained=DIR --tasks mme,...``.

lmms-eval (the LLaVA team's evaluation framework) is an optional dependency, the ``eval`` extra plus lmms-eval
itself without its own requirements: ``make setup`` installs both (``EVAL=0`` leaves them out, ``make
eval-setup`` adds them later; docs/evaluation.md, section "lmms-eval", says why that way). This module imports
lmms-eval at the top and so is importable only where it is installed; the ``lmms_eval.models`` entry point in
pyproject.toml points at :func:`manifests`, which is how ``--model maven`` finds :class:`MavenLmms`.

What lmms-eval hands a model, and what this one does with it:

* ``generate_until``: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``; the images are
  ``doc_to_visual(doc)``. A context without ``<image>`` gets one ``<image>`` per image in front of it, joined by
  spaces and followed by a newline, as lmms-eval's own ``llava`` model writes it; a context with placeholders
  is used as it is. The prompt is then rendered with the template the model was trained with
  (:class:`maven_dist.inference.MavenProcessor`). ``until`` becomes stop strings (and the answer is cut at the
  first of them), ``max_new_tokens`` (or ``max_gen_toks``), ``temperature``, ``top_p``, ``num_beams`` and
  ``do_sample`` map to :meth:`MavenGenerator.generate`: greedy unless ``do_sample`` is true or, where it is
  not given, ``temperature`` is above 0 (``do_sample`` without a temperature samples at 1.0).
* ``loglikelihood`` (lmms-eval's ``multiple_choice`` tasks): ``(context, continuation, ...)``. The
  continuation loses its leading whitespace (lmms-eval's ``target_delimiter``; training tokenises an answer
  on its own) and is scored by :meth:`MavenGenerator.loglikelihood`. lmms-eval 0.7 picks the option with the
  *smallest* value (``np.argmin`` in ``Task.process_results``, because its reference models return a loss), so
  the first value returned is the negative log-likelihood: the summed log-probability with its sign flipped.
  ``acc`` is then the most likely option and ``acc_norm`` the most likely per character, as in lm-eval.

``control=blank|swap|none`` in ``--model_args`` asks every request under an image-blind control
(``maven_dist/eval/controls.py``): each image replaced by the constant blank image, the document's images
replaced by those of the next document of the split with as many images, or no images (and no
placeholders). Run the task once without and once with the control: the difference of lmms-eval's scores
is the visual gain that ``maven eval --control`` reports.

Requests are answered ``batch_size`` at a time (generation options must agree within a batch), longest
context first; results come back in request order. Data-parallel runs (``accelerate launch -m lmms_eval``,
``torchrun``) work as lmms-eval arranges them: it splits the documents by rank, and the model loads on
``cuda:$LOCAL_RANK``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from maven_dist.contract.vocab import IMAGE_PLACEHOLDER
from maven_dist.eval.controls import CONTROLS, blank_image, without_placeholders

log = logging.getLogger(__name__)

MODEL_ID = "maven"
DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
}  # fmt: skip
GEN_KWARGS = {"until", "max_new_tokens", "max_gen_toks", "temperature", "top_p", "num_beams", "do_sample"}


def manifests():
    """The ``lmms_eval.models`` entry point: ``--model maven`` is :class:`MavenLmms`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.MavenLmms")]


class MavenLmms(lmms):
    """A MaVEn directory (a stage export or a ``maven merge`` output) behind lmms-eval's simple-model API.

    ``--model_args pretrained=DIR[,device=cuda:0][,dtype=bf16][,max_new_tokens=256][,control=blank]`` and
    lmms-eval's ``--batch_size N``; ``max_new_tokens`` is the default for tasks that set none; ``control`` asks
    under an image-blind control (module doc).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | Path,
        device: str | None = None,
        dtype: str = "fp32",
        batch_size: int | str = 1,
        max_new_tokens: int = 256,
        control: str = "",
        max_batch_size: int | None = None,  # passed by lmms-eval; batches here have a fixed size
    ) -> None:
        super().__init__()
        from maven_dist.inference import MavenGenerator

        _check_filelock()
        _keep_loglikelihood_pairs()

        if str(dtype).lower() not in DTYPE_ALIASES:
            raise ValueError(f"dtype={dtype!r}: choose one of {sorted(set(DTYPE_ALIASES))}")
        if str(batch_size).isdigit() and int(batch_size) >= 1:
            self.batch_size_per_gpu = int(batch_size)
        else:
            raise ValueError(f"batch_size={batch_size!r}: give a whole number >= 1 ('auto' is not supported)")
        self.max_new_tokens = int(max_new_tokens)
        if control not in ("", *CONTROLS):
            raise ValueError(f"control={control!r}: choose one of {', '.join(CONTROLS)} (or leave it out)")
        self.control = control
        self.generator = MavenGenerator.from_pretrained(
            pretrained, device=_device(device), dtype=DTYPE_ALIASES[str(dtype).lower()]
        )
        self._ignored: set[str] = set()

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self.generator.model.device

    # ------------------------------------------------------------------ requests

    def generate_until(self, requests) -> list[str]:
        args = [r.args for r in requests]
        options = [self._generation_options(a[1]) for a in args]
        answers: list[str | None] = [None] * len(args)
        order = sorted(range(len(args)), key=lambda i: -len(args[i][0]))  # longest first: less padding
        batches = _batches(order, self.batch_size, key=lambda i: json.dumps(options[i]))
        for batch in tqdm(batches, desc="maven generate_until", disable=self.rank != 0):
            prompts, images = self._prompts([args[i] for i in batch])
            opts = options[batch[0]]
            outs = self.generator.generate(prompts, images=images, **opts)
            for i, out in zip(batch, outs, strict=True):
                answers[i] = _cut(out.text, opts["stop"])
                self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), answers[i])
        return answers  # type: ignore[return-value]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        args = [r.args for r in requests]
        targets = []
        for _, target, _, doc_id, task, split in args:
            if callable(target):  # output_type: loglikelihood passes doc_to_target itself
                target = target(self.task_dict[task][split][doc_id])
            targets.append(str(target).lstrip())
        scores: list[tuple[float, bool] | None] = [None] * len(args)
        order = sorted(range(len(args)), key=lambda i: -len(args[i][0]) - len(targets[i]))
        for batch in tqdm(
            _batches(order, self.batch_size), desc="maven loglikelihood", disable=self.rank != 0
        ):
            prompts, images = self._prompts([args[i] for i in batch])
            outs = self.generator.loglikelihood(prompts, [targets[i] for i in batch], images=images)
            for i, (logprob, greedy) in zip(batch, outs, strict=True):
                scores[i] = (-logprob, greedy)  # lmms-eval takes the argmin (see the module docstring)
                self.cache_hook.add_partial("loglikelihood", (args[i][0], args[i][1]), scores[i])
        return scores  # type: ignore[return-value]

    def generate_until_multi_round(self, requests) -> list[str]:
        """lmms-eval's ``lmms`` base class declares it abstract, so the class must define it to be built; no
        task this model is meant for issues it (multi-round tasks are lmms-eval's chat-model interface)."""
        raise NotImplementedError("the maven model answers generate_until and loglikelihood tasks only")

    # ------------------------------------------------------------------ helpers

    def _prompts(self, args: Sequence[tuple]) -> tuple[list[str], list[list[Image.Image | str | Path]]]:
        """One batch's prompts and images; a document's images are read once (its choices share them)."""
        read: dict[tuple, list] = {}
        prompts, images = [], []
        for ctx, _, doc_to_visual, doc_id, task, split in args:
            if (task, split, doc_id) not in read:
                read[task, split, doc_id] = self._pictures(doc_to_visual, task, split, doc_id)
            pictures = read[task, split, doc_id]
            if self.control == "none":
                ctx = without_placeholders(ctx)
            if pictures and IMAGE_PLACEHOLDER not in ctx:  # lmms-eval's llava: "<image> <image>\n" + context
                ctx = " ".join([IMAGE_PLACEHOLDER] * len(pictures)) + "\n" + ctx
            prompts.append(ctx)
            images.append(pictures)
        return prompts, images

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id) -> list[Image.Image | str | Path]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
        return _images(visuals, task, doc_id)

    def _pictures(self, doc_to_visual, task: str, split: str, doc_id) -> list[Image.Image | str | Path]:
        """The document's images, or what ``control`` puts in their place (module doc)."""
        own = self._visuals(doc_to_visual, task, split, doc_id)
        if self.control == "blank":
            return [blank_image() for _ in own]
        if self.control == "none":
            return []
        if self.control == "swap":
            docs = self.task_dict[task][split]
            for step in range(1, len(docs)):
                other = self._visuals(doc_to_visual, task, split, (doc_id + step) % len(docs))
                if len(other) == len(own):
                    return other
        return own

    def _generation_options(self, gen_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        for key in sorted(set(gen_kwargs or {}) - GEN_KWARGS - self._ignored):
            log.warning("maven: gen_kwargs %s=%r is not supported and is ignored", key, gen_kwargs[key])
            self._ignored.add(key)
        return generation_options(gen_kwargs, self.max_new_tokens)


def generation_options(gen_kwargs: dict[str, Any] | None, max_new_tokens: int) -> dict[str, Any]:
    """A task's ``generation_kwargs`` as :meth:`MavenGenerator.generate` options (`max_new_tokens` is the
    default where the task sets none)."""
    kw = dict(gen_kwargs or {})
    until = kw.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(kw.get("temperature") or 0.0)
    if "do_sample" in kw:  # transformers' rule: do_sample decides; sampling needs a temperature above 0
        temperature = (temperature or 1.0) if _truthy(kw["do_sample"]) else 0.0
    top_p = kw.get("top_p")
    return {
        "max_new_tokens": int(kw.get("max_new_tokens") or kw.get("max_gen_toks") or max_new_tokens),
        "temperature": temperature,
        "top_p": 1.0 if top_p is None else float(top_p),
        "num_beams": int(kw.get("num_beams") or 1),
        "stop": [s for s in until if s] or None,
    }


def _check_filelock() -> None:
    """lmms-eval 0.7.3's ``simple_evaluate`` patches ``filelock._api`` (filelock 3.16 to 3.x), which filelock 4
    no longer has: say so before the model loads rather than after."""
    evaluator = importlib.import_module("lmms_eval.evaluator")
    if (
        hasattr(evaluator, "_enable_reentrant_filelocks")
        and importlib.util.find_spec("filelock._api") is None
    ):
        raise ImportError(
            "lmms-eval's evaluator imports filelock._api, which this filelock no longer has: "
            "pip install 'filelock>=3.16,<4' (the eval extra pins it; docs/evaluation.md, section lmms-eval)"
        )


def _keep_loglikelihood_pairs() -> None:
    """lmms-eval 0.7.x's evaluator passes every model output through ``unwrap_generation_output``, which turns
    anything but text into ``str(output)``: a loglikelihood pair ``(12.3, False)`` reaches
    ``Task.process_results`` as the string "(12.3, False)" and every ``multiple_choice`` task fails there
    ("too many values to unpack"), whatever the model. Let (number, bool) pairs through unchanged; where
    lmms-eval already keeps them, nothing is replaced. The one change to lmms-eval made here."""
    evaluator = importlib.import_module("lmms_eval.evaluator")
    unwrap = getattr(evaluator, "unwrap_generation_output", None)
    if unwrap is None or getattr(unwrap, "keeps_pairs", False) or not isinstance(unwrap((0.0, True))[0], str):
        return

    def unwrap_keeping_pairs(output):
        if (
            isinstance(output, tuple | list)
            and len(output) == 2
            and isinstance(output[0], int | float)
            and isinstance(output[1], bool)
        ):
            return (float(output[0]), output[1]), None
        return unwrap(output)

    unwrap_keeping_pairs.keeps_pairs = True  # type: ignore[attr-defined]
    evaluator.unwrap_generation_output = unwrap_keeping_pairs


def _device(device: str | None) -> str:
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return f"cuda:{local_rank}"
    return device


def _batches(indices: Iterable[int], size: int, key: Callable[[int], str] | None = None) -> list[list[int]]:
    """Indices in batches of at most `size`, each batch sharing one `key`, in the order given."""
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(key(i) if key else "", []).append(i)
    return [g[k : k + size] for g in groups.values() for k in range(0, len(g), size)]


def _cut(text: str, stop: Sequence[str] | None) -> str:
    """The answer up to the first stop string (generation stops after the token that completes one)."""
    for s in stop or ():
        text = text.split(s, 1)[0]
    return text


def _images(visuals, task: str, doc_id) -> list[Image.Image | str | Path]:
    """``doc_to_visual``'s answer as a flat list of images (PIL images or image files)."""
    if visuals is None:
        return []
    if not isinstance(visuals, list | tuple):
        visuals = [visuals]
    out = []
    for v in visuals:
        if isinstance(v, list | tuple):
            out += _images(v, task, doc_id)
        elif isinstance(v, Image.Image | str | Path):
            out.append(v)
        elif v is not None:
            raise TypeError(
                f"task {task}, doc {doc_id}: MaVEn takes images, not {type(v).__name__} (videos and audio are "
                "not supported)"
            )
    return out


def _truthy(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")
