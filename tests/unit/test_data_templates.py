"""Conversation templates: exact token and label sequences, and masking of everything but answers."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from maven_dist.data.templates import (
    LLAMA_2_SYSTEM,
    VICUNA_SYSTEM,
    ConversationError,
    check_turns,
    render,
)
from maven_dist.offline.tokenizer_training import train_tokenizer

IMG = "<IMG>"  # marks a placeholder in the expected sequences below

TURNS = [
    {"from": "human", "value": "<image>\nWhat is shown?"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "And the background?"},
    {"from": "gpt", "value": "It is striped."},
]


@pytest.fixture(scope="module")
def words():
    """A real word-level HF tokenizer, so the expected sequences can be written out word by word."""
    texts = [VICUNA_SYSTEM, LLAMA_2_SYSTEM, "USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>>"]
    texts += [t["value"] for t in TURNS]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in " ".join(texts).split():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def _ids(tokenizer, tokens: list[str]) -> list[int]:
    return [IMAGE_PLACEHOLDER_ID if t == IMG else tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _expect(tokenizer, segments: list[tuple[str | list[str], bool]]) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for text, trained in segments:
        tokens = text if isinstance(text, list) else text.split()
        seg = _ids(tokenizer, tokens)
        ids += seg
        labels += seg if trained else [IGNORE_INDEX] * len(seg)
    return ids, labels


def test_vicuna_v1_pinned(words):
    got = render(TURNS, "vicuna_v1", words)
    ids, labels = _expect(
        words,
        [
            (["<s>"], False),
            (f"{VICUNA_SYSTEM} USER: {IMG} What is shown? ASSISTANT:", False),
            ("A red circle. </s>", True),
            ("USER: And the background? ASSISTANT:", False),
            ("It is striped. </s>", True),
        ],
    )
    assert got.input_ids == ids
    assert got.labels == labels
    assert got.num_images == 1


def test_llama_2_pinned(words):
    got = render(TURNS, "llama_2", words)
    ids, labels = _expect(
        words,
        [
            (["<s>"], False),
            (f"[INST] <<SYS>> {LLAMA_2_SYSTEM} <</SYS>> {IMG} What is shown? [/INST]", False),
            ("A red circle. </s>", True),
            ("<s> [INST] And the background? [/INST]", False),
            ("It is striped. </s>", True),
        ],
    )
    assert got.input_ids == ids
    assert got.labels == labels


def test_plain_pinned(words):
    got = render(TURNS[:2], "plain", words)
    ids, labels = _expect(words, [(["<s>", IMG], False), ("A red circle.", True)])
    assert got.input_ids == ids
    assert got.labels == labels
    with pytest.raises(ValueError, match="one question and one answer"):
        render(TURNS, "plain", words)


def test_two_images_become_two_placeholders(words):
    turns = [
        {"from": "human", "value": "<image>\n<image>\nWhat is shown?"},
        {"from": "gpt", "value": "A red circle."},
    ]
    for name in ("vicuna_v1", "llama_2", "plain"):
        got = render(turns, name, words)
        assert got.num_images == 2
        assert got.expanded_length(10) == len(got.input_ids) + 2 * 9


def test_bpe_tokenizer_masks_exactly_the_answers(tmp_path):
    """With the project's BPE tokenizer: the trained positions decode to the answers and their </s>."""
    tok = train_tokenizer([VICUNA_SYSTEM, LLAMA_2_SYSTEM] + [t["value"] for t in TURNS] * 4, tmp_path, 320)
    answers = {
        "vicuna_v1": "A red circle.</s> It is striped.</s>",
        "llama_2": "A red circle. </s> It is striped. </s>",  # LLaVA's and Meta's " {answer} </s>"
    }
    for name, want in answers.items():
        got = render(TURNS, name, tok)
        trained = [i for i, lab in zip(got.input_ids, got.labels, strict=True) if lab != IGNORE_INDEX]
        assert tok.decode(trained) == want
        assert [lab for lab in got.labels if lab != IGNORE_INDEX] == trained
        assert got.input_ids[0] == tok.bos_token_id and got.labels[0] == IGNORE_INDEX
        assert got.input_ids.count(IMAGE_PLACEHOLDER_ID) == 1


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        ([], "empty_conversation"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], "non_alternating"),
        ([{"from": "human", "value": "a"}], "non_alternating"),
        ([{"from": "system", "value": "a"}, {"from": "gpt", "value": "b"}], "unknown_role"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}], "non_string_value"),
    ],
)
def test_bad_conversations_say_why(turns, reason):
    with pytest.raises(ConversationError) as err:
        check_turns(turns)
    assert err.value.reason == reason
