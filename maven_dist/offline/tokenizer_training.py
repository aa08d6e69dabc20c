"""Train the tiny recipe's text tokenizer: a LLaMA-shaped BPE with byte fallback.

The tiny recipe has no Vicuna checkpoint to borrow a tokenizer from, so we train one on the
synthetic captions. It mirrors the LLaMA/Vicuna SentencePiece tokenizer in every way the rest of
the code depends on:

* ids ``<unk>``=0, ``<s>``=1, ``</s>``=2, then the 256 byte tokens ``<0x00>``..``<0xFF>`` (ids 3..258),
  then the learned pieces, exactly the LLaMA order;
* ``▁`` marks word starts (Metaspace, prepended to the first word only, like SentencePiece's
  ``add_dummy_prefix``), and any character outside the learned alphabet falls back to its UTF-8
  bytes, so every string encodes and decodes losslessly;
* ``<s>`` is prepended by the post-processor, and ``pad`` is ``<unk>`` as LLaVA sets it for Vicuna.

Training is deterministic: the BPE trainer breaks frequency ties by token order, and we feed the
texts in the given order with no parallel shuffling.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
_WORD_START = "▁"


def _learn_pieces(texts: Iterable[str], num_pieces: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Run BPE on `texts`; return the learned pieces (alphabet + merges, in id order) and the merges."""
    probe = Tokenizer(models.BPE(unk_token="<unk>"))
    probe.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_WORD_START, prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=num_pieces + 1,  # + the <unk> the trainer needs as its own first token
        special_tokens=["<unk>"],
        show_progress=False,
        limit_alphabet=num_pieces // 2,  # rare characters go to byte fallback, not the alphabet
    )
    probe.train_from_iterator(list(texts), trainer=trainer)
    vocab = probe.get_vocab()
    pieces = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if tok != "<unk>"]
    merges = [tuple(m) for m in probe.model.get_merges()] if hasattr(probe.model, "get_merges") else []
    if not merges:  # older tokenizers: read merges from the serialised model
        import json

        raw = json.loads(probe.to_str())["model"]["merges"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw]
    return pieces, merges


def build_tokenizer_object(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """The raw `tokenizers.Tokenizer` with LLaMA's id layout (see module docstring)."""
    reserved = len(SPECIALS) + len(BYTE_TOKENS)
    if vocab_size <= reserved + 16:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for learned pieces; use > {reserved + 16}")
    pieces, merges = _learn_pieces(texts, vocab_size - reserved)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + BYTE_TOKENS)}
    for piece in pieces:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_WORD_START, prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(_WORD_START, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens(SPECIALS)
    return tok


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train on `texts`, save a HF tokenizer directory at `out_dir`, and return it loaded from there.

    The directory loads with ``transformers.AutoTokenizer.from_pretrained(out_dir)``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer_object(texts, vocab_size),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",  # LLaVA: tokenizer.pad_token = tokenizer.unk_token for Vicuna
        padding_side="right",
        model_max_length=1 << 30,
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))
