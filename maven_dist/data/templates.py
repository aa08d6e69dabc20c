"""Conversation templates with label masking: only what the assistant says is trained.

The three templates are LLaVA's (``llava/conversation.py``):

* ``vicuna_v1`` — ``{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>``
* ``llama_2`` — ``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q1} [/INST] {a1} </s><s>[INST] {q2} [/INST] {a2} </s>``
* ``plain`` — ``<image>...{caption}\\n`` (the pre-training format: images then the caption, no roles)

A rendered sample is a list of segments, each tokenized on its own and concatenated; an ``<image>``
in a text becomes :data:`IMAGE_PLACEHOLDER_ID`, with the text on either side tokenized separately
(what LLaVA's ``tokenizer_image_token`` does). Because labels are built per segment, masking is exact
by construction: LLaVA instead tokenizes the whole prompt and re-derives turn boundaries with
length arithmetic, which goes wrong whenever the tokenizer merges across a boundary (the
"tokenization mismatch" warning, LLaVA issue #1029). Assistant answers and their ``</s>`` are
trained; the system prompt, the roles, the questions and the images are not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER_ID

TemplateName = Literal["vicuna_v1", "llama_2", "plain"]
TEMPLATES: tuple[str, ...] = ("vicuna_v1", "llama_2", "plain")

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
HUMAN, GPT = "human", "gpt"


@dataclass(frozen=True)
class Rendered:
    """One sample as token ids with labels (same length); placeholders stand for images."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_images(self) -> int:
        return sum(i == IMAGE_PLACEHOLDER_ID for i in self.input_ids)

    def expanded_length(self, tokens_per_image: int) -> int:
        """Sequence length once each placeholder is replaced by its visual tokens."""
        return len(self.input_ids) + self.num_images * (tokens_per_image - 1)


class _Builder:
    """Accumulates segments; text is tokenized piecewise around ``<image>``."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.labels: list[int] = []

    def text(self, text: str, trained: bool) -> None:
        for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k:
                self.ids.append(IMAGE_PLACEHOLDER_ID)
                self.labels.append(IGNORE_INDEX)
            if piece:
                ids = self.tokenizer.encode(piece, add_special_tokens=False)
                self.ids += ids
                self.labels += ids if trained else [IGNORE_INDEX] * len(ids)

    def token(self, token_id: int, trained: bool) -> None:
        self.ids.append(token_id)
        self.labels.append(token_id if trained else IGNORE_INDEX)

    def done(self) -> Rendered:
        return Rendered(self.ids, self.labels)


class ConversationError(ValueError):
    """A conversation that cannot be rendered; ``reason`` is the short code preparation records."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_turns(turns: object) -> list[tuple[str, str]]:
    """(question, answer) pairs of a LLaVA conversation; raises ConversationError saying what is wrong."""
    if not isinstance(turns, list) or not turns:
        raise ConversationError("empty_conversation", "conversation is empty or not a list of turns")
    for k, turn in enumerate(turns):
        role = turn.get("from") if isinstance(turn, dict) else None
        if role not in (HUMAN, GPT):
            raise ConversationError(
                "unknown_role", f"turn {k} has unknown role {role!r}; expected 'human' or 'gpt'"
            )
        if not isinstance(turn.get("value"), str):
            kind = type(turn.get("value")).__name__
            raise ConversationError("non_string_value", f"turn {k} value is {kind}, not a string")
    for k, turn in enumerate(turns):
        expected = HUMAN if k % 2 == 0 else GPT
        if turn["from"] != expected:
            raise ConversationError(
                "non_alternating",
                f"conversation does not alternate: turn {k} is from {turn['from']!r}, expected {expected!r}",
            )
    if len(turns) % 2:
        raise ConversationError(
            "non_alternating",
            f"conversation ends with a human turn (turn {len(turns) - 1}) that has no answer",
        )
    return [(turns[k]["value"], turns[k + 1]["value"]) for k in range(0, len(turns), 2)]


def render(turns: list[dict], template: TemplateName, tokenizer) -> Rendered:
    """Render LLaVA turns (``[{"from": "human"|"gpt", "value": str}, ...]``) with label masking."""
    return _render(check_turns(turns), None, template, tokenizer)


def render_prompt(turns: list[dict], template: TemplateName, tokenizer) -> list[int]:
    """The token ids a model is prompted with to answer the last (human) turn of `turns`: exactly what
    :func:`render` puts before that answer in training (so generation sees the training distribution)."""
    if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict):
        raise ConversationError("empty_conversation", "the prompt has no turns")
    if turns[-1].get("from") != HUMAN:
        raise ConversationError("non_alternating", "the last turn of a prompt must be from 'human'")
    question = turns[-1].get("value")
    if not isinstance(question, str):
        raise ConversationError("non_string_value", f"the last turn's value is {type(question).__name__}")
    history = check_turns(turns[:-1]) if len(turns) > 1 else []
    return _render(history, question, template, tokenizer).input_ids


def _render(
    pairs: list[tuple[str, str]], question: str | None, template: TemplateName, tokenizer
) -> Rendered:
    """`pairs` of (question, answer), then, for a prompt, the open `question` (no answer)."""
    b = _Builder(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    rounds: list[tuple[str, str | None]] = [*pairs, *([(question, None)] if question is not None else [])]
    if template == "vicuna_v1":
        b.token(bos, trained=False)
        for k, (q, answer) in enumerate(rounds):
            prefix = f"{VICUNA_SYSTEM} " if k == 0 else ""
            b.text(f"{prefix}USER: {q} ASSISTANT:", trained=False)
            if answer is not None:
                b.text(answer, trained=True)
                b.token(eos, trained=True)
    elif template == "llama_2":
        for k, (q, answer) in enumerate(rounds):
            b.token(bos, trained=False)
            system = f"<<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\n" if k == 0 else ""
            b.text(f"[INST] {system}{q} [/INST]", trained=False)
            if answer is not None:
                b.text(answer, trained=True)
                b.token(eos, trained=True)
    elif template == "plain":
        # LLaVA's pre-training format keeps only the images of the question and the first answer.
        if len(rounds) != 1:
            raise ValueError(f"template 'plain' takes one question and one answer, got {len(rounds)} rounds")
        q, answer = rounds[0]
        b.token(bos, trained=False)
        b.text(IMAGE_PLACEHOLDER * q.count(IMAGE_PLACEHOLDER), trained=False)
        if answer is not None:
            b.text(answer + "\n", trained=True)
    else:
        raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    return b.done()


# Jinja chat templates for ``tokenizer.apply_chat_template`` that render what :func:`render_prompt` and
# :func:`render` tokenize (messages: {"role": "user"|"assistant", "content": str with <image>}); a saved
# MaVEn tokenizer carries the one it was trained with. tests/unit/test_generation.py checks them token by
# token against the training path. Answers follow " " + content: a SentencePiece (LLaMA) tokenizer
# encodes an answer alone with the same leading "\u2581" the space gives in the string.
CHAT_TEMPLATES: dict[str, str] = {
    "vicuna_v1": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% if loop.first %}" + VICUNA_SYSTEM + " {% endif %}USER: {{ m['content'] }} ASSISTANT:"
        "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
    "llama_2": (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
        "{% if loop.first %}<<SYS>>\n" + LLAMA_2_SYSTEM + "\n<</SYS>>\n\n{% endif %}"
        "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
    "plain": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '<image>' * m['content'].count('<image>') }}{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    ),
}


def tokenize_with_images(text: str, tokenizer) -> list[int]:
    """Token ids of a rendered chat-template string as training tokenizes the same conversation: the text is
    cut at the BOS/EOS strings and at every ``<image>`` (which becomes :data:`IMAGE_PLACEHOLDER_ID`), and
    each piece is tokenized on its own, so a tokenizer that marks the start of a text (SentencePiece's
    dummy prefix) does so where training's separately tokenized segments have it."""
    specials = {
        t: tokenizer.convert_tokens_to_ids(t) for t in (tokenizer.bos_token, tokenizer.eos_token) if t
    }
    b = _Builder(tokenizer)
    pattern = "(" + "|".join(re.escape(t) for t in specials) + ")" if specials else None
    for piece in re.split(pattern, text) if pattern else [text]:
        if piece in specials:
            b.token(specials[piece], trained=False)
        elif piece:
            b.text(piece, trained=False)
    return b.ids
