"""Conversation templates with label masking: only what the assistant says is trained.

The three templates are LLaVA's (``llava/conversation.py``; ``docs/data_preparation.md``, "How text
becomes tokens", shows each with a Vicuna tokenizer):

* ``vicuna_v1`` — ``{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>``
* ``llama_2`` — ``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q1} [/INST] {a1} </s><s>[INST] {q2} [/INST] {a2} </s>``
* ``plain`` — ``<image>...{caption}\\n`` (the pre-training format: images then the caption, no roles)

A sample with exactly one ``<image>`` has it moved to the start of its turn, ``<image>\\n`` + the rest
stripped, as LLaVA's ``preprocess_multimodal`` does (LLaVA-Instruct often writes "...?\\n<image>"); with
several images each stays where the text puts it, which is how MaVEn's multi-image prompts say which
image is which. An answer that is empty or only whitespace is refused (``empty_answer``): LLaVA's format
cannot express it (its ``get_prompt`` treats an empty message as the open generation slot).

A rendered sample is a list of segments, each tokenized on its own and concatenated; an ``<image>``
in a text becomes :data:`IMAGE_PLACEHOLDER_ID`, with the text on either side tokenized separately
(what LLaVA's ``tokenizer_image_token`` does). Because labels are built per segment, masking is exact
by construction: LLaVA instead tokenizes the whole prompt and re-derives turn boundaries with
length arithmetic, which goes wrong whenever the tokenizer merges across a boundary (the
"tokenization mismatch" warning, LLaVA issue #1029). Assistant answers and their ``</s>`` are
trained; the system prompt, the roles, the questions and the images are not. Every segment starts
with SentencePiece's dummy prefix, so the tokenizer must be loaded with
:func:`maven_dist.data.tokenizer.load_text_tokenizer`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER_ID

TemplateName = Literal["vicuna_v1", "llama_2", "plain"]
TEMPLATES: tuple[str, ...] = ("vicuna_v1", "llama_2", "plain")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
"""LLaVA's ``conv_vicuna_v1`` (``--version v1`` in training, ``--conv-mode vicuna_v1`` in evaluation), the
prompt Vicuna v1.5 itself was tuned on; not ``conv_llava_v1``'s "curious human ... the human's questions"."""
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
    for k in range(1, len(turns), 2):
        if not turns[k]["value"].strip():
            raise ConversationError(
                "empty_answer",
                f"turn {k} (gpt) is empty or only whitespace: there is nothing to train on, and LLaVA's format "
                "has no way to write it; drop the round or the record",
            )
    return [(turns[k]["value"], turns[k + 1]["value"]) for k in range(0, len(turns), 2)]


def place_single_image(texts: list[str]) -> list[str]:
    """LLaVA's ``preprocess_multimodal``: where the turns hold exactly one ``<image>``, that turn becomes
    ``<image>\n`` + the rest of it stripped; with none or several, every turn is kept as written."""
    if sum(t.count(IMAGE_PLACEHOLDER) for t in texts) != 1:
        return list(texts)
    return [
        (IMAGE_PLACEHOLDER + "\n" + t.replace(IMAGE_PLACEHOLDER, "").strip()).strip()
        if IMAGE_PLACEHOLDER in t
        else t
        for t in texts
    ]


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
    texts = place_single_image(
        [t for pair in pairs for t in pair] + ([question] if question is not None else [])
    )
    rounds: list[tuple[str, str | None]] = [
        (texts[k], texts[k + 1] if k + 1 < len(texts) else None) for k in range(0, len(texts), 2)
    ]
    b = _Builder(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
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
                # LLaVA's SeparatorStyle.LLAMA_2 and Meta's chat format: " {answer} </s>", the space a token.
                b.text(answer + " ", trained=True)
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
# MaVEn tokenizer carries the one it was trained with. Each answer follows " " + content: with the dummy
# prefix on every text run (maven_dist/data/tokenizer.py) the space gives the answer's first "\u2581" as
# tokenizing the answer alone does. The single-image move and the refusal of empty answers are the
# functions' above. A `<image>` is no token of the vocabulary, so with images the text must go through
# :func:`tokenize_with_images`; the template refuses them unless the caller says so with
# ``image_placeholders=True`` (then ``tokenize=False``), so ``tokenize=True`` never returns the characters
# of "<image>" as if they were the image.
_CHAT_PREAMBLE = (
    "{%- set ns = namespace(images=0) -%}"
    "{%- for m in messages -%}{%- set ns.images = ns.images + m['content'].count('<image>') -%}{%- endfor -%}"
    "{%- if ns.images and not image_placeholders -%}{{ raise_exception('<image> is not a token of this "
    "vocabulary: render with apply_chat_template(messages, tokenize=False, image_placeholders=True) and "
    "tokenize with maven_dist.data.templates.tokenize_with_images(text, tokenizer), or use "
    "maven_dist.inference.MavenProcessor') }}{%- endif -%}"
)
_CONTENT = (
    "{%- set content = m['content'] -%}"
    "{%- if ns.images == 1 and '<image>' in content -%}"
    "{%- set content = ('<image>\\n' + content.replace('<image>', '') | trim) | trim -%}{%- endif -%}"
    "{%- if m['role'] == 'assistant' and content | trim == '' -%}"
    "{{ raise_exception('an assistant message is empty or only whitespace; the model was never trained on one') }}"
    "{%- endif -%}"
)
CHAT_TEMPLATES: dict[str, str] = {
    "vicuna_v1": (
        _CHAT_PREAMBLE + "{{ bos_token }}{% for m in messages %}" + _CONTENT + "{% if m['role'] == 'user' %}"
        "{% if loop.first %}" + VICUNA_SYSTEM + " {% endif %}USER: {{ content }} ASSISTANT:"
        "{% else %} {{ content }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
    "llama_2": (
        _CHAT_PREAMBLE
        + "{% for m in messages %}"
        + _CONTENT
        + "{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
        "{% if loop.first %}<<SYS>>\n" + LLAMA_2_SYSTEM + "\n<</SYS>>\n\n{% endif %}"
        "{{ content }} [/INST]{% else %} {{ content }} {{ eos_token }}{% endif %}{% endfor %}"
    ),
    "plain": (
        _CHAT_PREAMBLE + "{{ bos_token }}{% for m in messages %}" + _CONTENT + "{% if m['role'] == 'user' %}"
        "{{ '<image>' * content.count('<image>') }}{% else %}{{ content }}\n{% endif %}{% endfor %}"
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
