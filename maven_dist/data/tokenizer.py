"""The text tokenizer as every part of the project loads it: SentencePiece's own segmentation.

Vicuna ships LLaMA's SentencePiece ``tokenizer.model`` and no ``tokenizer.json``; transformers converts it
into a ``tokenizers`` pipeline, and the pipeline it builds is not SentencePiece's in one respect that
matters here. SentencePiece adds its dummy prefix ``▁`` to *every* text it encodes (``encode(" Yes")`` is
``▁ ▁Yes``, ``encode("USER")`` is ``▁USER``). transformers 5 (and 4 with ``legacy=False``) builds a
``Metaspace`` pre-tokenizer instead, which adds ``▁`` only where the text does not already start with a
space (``" Yes"`` loses its space) and, in a whole string, only before the first text run, not after a
``<s>`` or ``</s>`` (``<s>A``, ``</s>U SE R`` with LLaMA's vocabulary).

Training tokenizes every segment of a conversation on its own (``maven_dist/data/templates.py``), as
LLaVA's ``tokenizer_image_token`` does with the slow SentencePiece tokenizer: each segment starts with
the dummy prefix. :func:`build_text_tokenizer` rebuilds a Metaspace tokenizer with SentencePiece's rule:
a ``Prepend("▁")`` normaliser (which ``tokenizers`` applies to each run of text between special tokens)
and a Metaspace that no longer prepends. Then one segment encodes as SentencePiece encodes it, whatever
the transformers major, and a whole chat-template string encodes as its segments do (so
``apply_chat_template(..., tokenize=True)`` on an exported tokenizer gives the training ids; see
``docs/data_preparation.md``, "How text becomes tokens"). The result is a plain
``PreTrainedTokenizerFast`` whose ``tokenizer.json`` holds the whole pipeline: transformers 5 would
rebuild a saved ``LlamaTokenizer``'s pre-tokenizer from its ``legacy`` flag on load, a plain fast
tokenizer it loads as it is. Tokenizers without a Metaspace (byte-level BPE, WordLevel) are returned
unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

_WORD_START = "▁"


def _has_dummy_prefix(backend: Tokenizer) -> bool:
    """Whether `backend`'s normaliser already prepends the word-start mark to every text run (ours, or
    transformers 4's ``legacy=True`` pipeline). Read from the JSON form: ``tokenizers`` releases differ in
    what a normaliser ``Sequence`` exposes to Python."""
    normalizer = json.loads(backend.to_str()).get("normalizer") or {}
    parts = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    return any(p.get("type") == "Prepend" for p in parts)


def sentencepiece_backend(backend: Tokenizer) -> Tokenizer | None:
    """`backend` with SentencePiece's dummy-prefix rule (a copy), or None where it needs no change."""
    pre = backend.pre_tokenizer
    if not isinstance(pre, pre_tokenizers.Metaspace) or pre.prepend_scheme == "never":
        return None
    out = Tokenizer.from_str(backend.to_str())
    prepend = normalizers.Prepend(pre.replacement)
    out.normalizer = (
        prepend if backend.normalizer is None else normalizers.Sequence([backend.normalizer, prepend])
    )
    out.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=pre.replacement, prepend_scheme="never", split=pre.split
    )
    return out


def build_text_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """`tokenizer` as a plain ``PreTrainedTokenizerFast`` that segments as SentencePiece does (see the module
    docstring); already such a tokenizer, or one without a Metaspace pre-tokenizer, is returned as it is."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"{type(tokenizer).__name__} has no tokenizers backend; load the directory with a fast tokenizer"
        )
    rebuilt = sentencepiece_backend(backend)
    if rebuilt is None:
        if not isinstance(backend.pre_tokenizer, pre_tokenizers.Metaspace) and not _has_dummy_prefix(backend):
            return tokenizer  # not a SentencePiece-style tokenizer: nothing to align
        if type(tokenizer) is PreTrainedTokenizerFast:
            return tokenizer
        rebuilt = Tokenizer.from_str(backend.to_str())
    return PreTrainedTokenizerFast(
        tokenizer_object=rebuilt,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token,
        # LLaVA pads Vicuna with <unk> (its train.py: tokenizer.pad_token = tokenizer.unk_token)
        pad_token=tokenizer.pad_token if tokenizer.pad_token is not None else tokenizer.unk_token,
        padding_side=tokenizer.padding_side,
        truncation_side=tokenizer.truncation_side,
        model_max_length=tokenizer.model_max_length,
        clean_up_tokenization_spaces=tokenizer.clean_up_tokenization_spaces,
        chat_template=tokenizer.chat_template,
    )


def load_text_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer of a model directory (``tokenizer.json``, or SentencePiece's ``tokenizer.model`` alone
    as ``lmsys/vicuna-7b-v1.5`` ships it), through :func:`build_text_tokenizer`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
        # transformers reads tokenizer.model with sentencepiece and, when that import fails, falls back to
        # tiktoken and says "tiktoken is required", which points the user the wrong way.
        try:
            import sentencepiece  # noqa: F401
        except ImportError as err:
            raise ImportError(
                f"{path} has a SentencePiece tokenizer.model and no tokenizer.json: reading it needs the "
                "sentencepiece package (a dependency of maven_dist: pip install -c constraints.txt sentencepiece)"
            ) from err
    return build_text_tokenizer(AutoTokenizer.from_pretrained(str(path)))
