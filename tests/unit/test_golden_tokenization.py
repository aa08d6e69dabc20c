"""Golden tokenization: LLaVA-1.5's prompt layouts with a Vicuna-shaped SentencePiece tokenizer (issue 24).

The expected sequences are written here from LLaVA's rules (``llava/conversation.py``: ``conv_vicuna_v1``
with ``SeparatorStyle.TWO``, ``conv_llava_llama_2`` with ``SeparatorStyle.LLAMA_2``, ``conv_llava_plain``;
``train.py:preprocess_multimodal`` for the single image), not taken from the code under test: the texts
after LLaVA's image move are spelled out per case, each layout is laid out below, and each text segment
is encoded by SentencePiece itself (``sentencepiece.SentencePieceProcessor``, the reference LLaMA's
``tokenizer.model`` is read with), never by transformers. The project's deliberate difference from LLaVA
is that segments are tokenized on their own (docs/data_preparation.md, "How text becomes tokens"); at
the boundaries where that matters the pieces are also pinned by hand.

Every case is checked four ways: training (``render``: ids and labels), the generation prompt
(``render_prompt``), the exported tokenizer's ``apply_chat_template(tokenize=False)`` through
``tokenize_with_images``, and for conversations without images ``apply_chat_template(tokenize=True)``
on the exported tokenizer loaded by plain transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from transformers import AutoTokenizer

from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, extend_tokenizer
from maven_dist.data.templates import (
    CHAT_TEMPLATES,
    ConversationError,
    check_turns,
    render,
    render_prompt,
    tokenize_with_images,
)
from maven_dist.data.tokenizer import load_text_tokenizer
from tests.helpers.hub_models import train_llama_sentencepiece, write_vicuna_tokenizer

# LLaVA's conv_vicuna_v1.system and conv_llava_llama_2.system, written out.
VICUNA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
LLAMA_2_SYS = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
BOS, EOS, IMG = "<s>", "</s>", "<image>"


@dataclass(frozen=True)
class Case:
    name: str
    turns: tuple[str, ...]
    """human, gpt, human, gpt, ... as the record has them."""
    placed: tuple[str, ...]
    """The same turns after LLaVA's preprocess_multimodal (the single image moved), written out by hand."""


CASES = [
    Case(
        "image_start",
        ("<image>\nWhat is shown?", "A red circle."),
        ("<image>\nWhat is shown?", "A red circle."),
    ),
    Case(
        "image_end",
        ("What is shown?\n<image>", "A red circle."),
        ("<image>\nWhat is shown?", "A red circle."),
    ),
    Case(
        "image_middle",
        ("What is in <image> the image?", "A red circle."),
        ("<image>\nWhat is in  the image?", "A red circle."),
    ),
    Case(
        "two_images_stay",
        ("Compare <image> with <image>.", "The first image has 12 circles."),
        ("Compare <image> with <image>.", "The first image has 12 circles."),
    ),
    Case(
        "multi_turn",
        ("What colour is the circle?  <image> ", "The circle is red.", "And the square?", "It is blue."),
        ("<image>\nWhat colour is the circle?", "The circle is red.", "And the square?", "It is blue."),
    ),
    Case(
        "spaces",
        ("  What colour is the circle?  ", "  It is blue.  ", " And the square?", " Yes"),
        ("  What colour is the circle?  ", "  It is blue.  ", " And the square?", " Yes"),
    ),
    Case(
        "unicode",
        ("Say café 🙂 12 naïve 日本", "über straße 🙂"),
        ("Say café 🙂 12 naïve 日本", "über straße 🙂"),
    ),
    Case(
        "quoted_roles",
        ('He said "USER: hi" and "ASSISTANT: no". What now?', "Say hello.</p>"),
        ('He said "USER: hi" and "ASSISTANT: no". What now?', "Say hello.</p>"),
    ),
]
PLAIN_CASES = [
    Case("image_start", ("<image>\nDescribe the image.", "A red circle."), ("<image>", "A red circle.")),
    Case("image_end", ("Describe the image. <image>", "A red circle. "), ("<image>", "A red circle. ")),
    Case("two_images", ("<image> <image>", "Two images."), ("<image><image>", "Two images.")),
    Case("unicode", ("<image>", " café 🙂 12 naïve"), ("<image>", " café 🙂 12 naïve")),
]


def vicuna_layout(t: tuple[str, ...]) -> list[tuple[str, bool]]:
    """conv_vicuna_v1: system + " " + "USER: q ASSISTANT: a</s>" per round (sep " ", sep2 "</s>")."""
    out: list[tuple[str, bool]] = [(BOS, False)]
    for k in range(0, len(t), 2):
        out.append((f"{VICUNA_SYS} USER: {t[k]} ASSISTANT:" if k == 0 else f"USER: {t[k]} ASSISTANT:", False))
        if k + 1 < len(t):
            out += [(t[k + 1], True), (EOS, True)]
    return out


def llama_2_layout(t: tuple[str, ...]) -> list[tuple[str, bool]]:
    """conv_llava_llama_2: "<s>[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s>" per round."""
    out: list[tuple[str, bool]] = []
    for k in range(0, len(t), 2):
        system = f"<<SYS>>\n{LLAMA_2_SYS}\n<</SYS>>\n\n" if k == 0 else ""
        out += [(BOS, False), (f"[INST] {system}{t[k]} [/INST]", False)]
        if k + 1 < len(t):
            out += [(t[k + 1] + " ", True), (EOS, True)]
    return out


def plain_layout(t: tuple[str, ...]) -> list[tuple[str, bool]]:
    """conv_llava_plain: the images, then the caption and "\\n" (no end of sequence)."""
    out: list[tuple[str, bool]] = [(BOS, False), (t[0], False)]
    return out + ([(t[1] + "\n", True)] if len(t) > 1 else [])


LAYOUTS = {"vicuna_v1": vicuna_layout, "llama_2": llama_2_layout, "plain": plain_layout}


def expected(sp, layout: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels: specials by id, every text cut at <image> and each piece encoded by SentencePiece."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in layout:
        if text in (BOS, EOS):
            seg = [sp.piece_to_id(text)]
        else:
            seg = []
            for k, piece in enumerate(text.split(IMG)):
                seg += ([IMAGE_PLACEHOLDER_ID] if k else []) + (sp.encode(piece) if piece else [])
        ids += seg
        labels += seg if trained else [IGNORE_INDEX] * len(seg)
    return ids, labels


def as_turns(texts: tuple[str, ...]) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(texts)]


def as_messages(texts: tuple[str, ...]) -> list[dict]:
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": v} for k, v in enumerate(texts)]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_llama_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer.model")


@pytest.fixture(scope="module")
def sp(spm_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(spm_model))


@pytest.fixture(scope="module")
def tok(spm_model, tmp_path_factory):
    """The tokenizer as training loads a Vicuna directory (tokenizer.model only)."""
    return load_text_tokenizer(write_vicuna_tokenizer(tmp_path_factory.mktemp("vicuna"), spm_model))


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """The tokenizer a stage export saves (visual vocabulary added), loaded back by plain transformers."""
    out = tmp_path_factory.mktemp("export")
    tok.save_pretrained(out)
    saved = AutoTokenizer.from_pretrained(out)
    extend_tokenizer(saved, 16, 128)
    saved.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def _cases():
    for template in ("vicuna_v1", "llama_2"):
        for case in CASES:
            yield pytest.param(template, case, id=f"{template}-{case.name}")
    for case in PLAIN_CASES:
        yield pytest.param("plain", case, id=f"plain-{case.name}")


@pytest.mark.parametrize(("template", "case"), list(_cases()))
def test_golden_case(sp, tok, exported, template, case):
    layout = LAYOUTS[template]
    ids, labels = expected(sp, layout(case.placed))
    got = render(as_turns(case.turns), template, tok)
    assert got.input_ids == ids
    assert got.labels == labels

    # The generation prompt is the training sequence up to the last answer.
    prompt_ids, _ = expected(sp, layout(case.placed[:-1]))
    assert render_prompt(as_turns(case.turns[:-1]), template, tok) == prompt_ids
    assert ids[: len(prompt_ids)] == prompt_ids

    has_images = any(IMG in t for t in case.turns)
    for saved in (tok, exported):
        saved.chat_template = CHAT_TEMPLATES[template]
        for texts, want in ((case.turns, ids), (case.turns[:-1], prompt_ids)):
            text = saved.apply_chat_template(as_messages(texts), tokenize=False, image_placeholders=True)
            assert tokenize_with_images(text, saved) == want
            if not has_images:
                out = saved.apply_chat_template(as_messages(texts), tokenize=True)
                assert list(out["input_ids"] if hasattr(out, "keys") else out) == want
            else:
                with pytest.raises(Exception, match="not a token of this vocabulary"):
                    saved.apply_chat_template(as_messages(texts), tokenize=True)


def pieces(sp, ids: list[int]) -> list[str]:
    return ["<IMG>" if i == IMAGE_PLACEHOLDER_ID else sp.id_to_piece(i) for i in ids]


def test_pinned_pieces_at_the_boundaries(sp, tok):
    """What the layouts give, piece by piece, where LLaVA's rules and SentencePiece decide it."""

    def rendered(case: Case, template: str) -> list[str]:
        return pieces(sp, render(as_turns(case.turns), template, tok).input_ids)

    multi = rendered(CASES[4], "vicuna_v1")
    # conv_vicuna_v1's system prompt ("curious user"), with its own word start after <s>
    assert multi[:8] == ["<s>", "▁A", "▁chat", "▁between", "▁a", "▁curious", "▁user", "▁and"]
    # "USER: " (its space a piece), the image moved to the front, "\n" as the dummy prefix + the newline byte
    k = multi.index("<IMG>")
    assert multi[k - 3 : k + 4] == ["▁USER", ":", "▁", "<IMG>", "▁", "<0x0A>", "What"]
    # the answer starts a word after "ASSISTANT:", and so does the second round's USER after </s>
    assert multi[-21:] == [
        "▁ASSISTANT", ":", "▁The", "▁circle", "▁is", "▁red", ".", "</s>",
        "▁USER", ":", "▁And", "▁the", "▁square", "?",
        "▁ASSISTANT", ":", "▁It", "▁is", "▁blue", ".", "</s>",
    ]  # fmt: skip
    # llama_2: "answer </s>", the space a token of its own; the next round opens with <s>
    assert rendered(CASES[4], "llama_2")[-21:] == [
        "▁red", ".", "▁", "</s>", "<s>", "▁[", "INST", "]", "▁And", "▁the", "▁square", "?",
        "▁[/", "INST", "]", "▁It", "▁is", "▁blue", ".", "▁", "</s>",
    ]  # fmt: skip
    # leading and trailing spaces are kept: one "▁" each, next to the dummy prefix
    spaces = rendered(CASES[5], "vicuna_v1")
    assert spaces[-12:] == [
        "▁USER",
        ":",
        "▁",
        "▁And",
        "▁the",
        "▁square",
        "?",
        "▁ASSISTANT",
        ":",
        "▁",
        "▁Yes",
        "</s>",
    ]
    k = spaces.index("▁It")
    assert spaces[k - 4 : k + 7] == [
        "▁ASSISTANT",
        ":",
        "▁",
        "▁",
        "▁It",
        "▁is",
        "▁blue",
        ".",
        "▁",
        "▁",
        "</s>",
    ]
    # split digits and byte fallback for characters the corpus never had
    uni = rendered(CASES[6], "vicuna_v1")
    k = uni.index("1")
    assert uni[k - 6 : k + 3] == ["▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>", "▁", "1", "2", "▁naïve"]
    assert uni[k + 3 : k + 10] == ["▁", "<0xE6>", "<0x97>", "<0xA5>", "<0xE6>", "<0x9C>", "<0xAC>"]
    # roles quoted inside a question are text of the question: masked, and no turn boundary
    quoted = render(as_turns(CASES[7].turns), "vicuna_v1", tok)
    trained = [i for i, lab in zip(quoted.input_ids, quoted.labels, strict=True) if lab != IGNORE_INDEX]
    assert pieces(sp, trained) == ["▁Say", "▁hello", ".", "</", "p", ">", "</s>"]


def test_system_prompt_is_conv_vicuna_v1s(tok):
    ids = render(as_turns(CASES[1].turns), "vicuna_v1", tok).input_ids
    k = ids.index(IMAGE_PLACEHOLDER_ID)
    assert tok.decode(ids[1:k]) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: "
    )


@pytest.mark.parametrize("template", ["vicuna_v1", "llama_2", "plain"])
@pytest.mark.parametrize("answer", ["", "   ", "\n"])
def test_an_empty_answer_is_refused_everywhere(tok, template, answer):
    """LLaVA cannot write an empty answer (get_prompt takes it for the open slot); the project used to train
    a bare </s> for it while the chat template rendered "ASSISTANT: </s>"."""
    turns = as_turns(("<image>\nWhat is shown?", answer))
    with pytest.raises(ConversationError) as err:
        check_turns(turns)
    assert err.value.reason == "empty_answer"
    with pytest.raises(ConversationError):
        render(turns, template, tok)
    with pytest.raises(ConversationError):
        render_prompt([*as_turns(("Hi", answer)), {"from": "human", "value": "And?"}], template, tok)
    tok.chat_template = CHAT_TEMPLATES[template]
    with pytest.raises(Exception, match="empty or only whitespace"):
        tok.apply_chat_template(as_messages(("What is shown?", answer)), tokenize=False)
