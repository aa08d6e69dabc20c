"""A small, dependency-free noun-phrase extractor for Grounding DINO prompts.

spaCy's models cannot be downloaded here (and are a heavy dependency for one job), so we chunk
the text the way a shallow parser would: lower-case words, split at punctuation and at function
words (determiners, pronouns, prepositions, conjunctions, auxiliaries, common verbs and -ing/-ed
verb forms), keep each run of the remaining words of at most ``max_words`` (its last words, the
head noun being last in English), and drop duplicates. "A man riding a brown horse on the beach."
gives ``["man", "brown horse", "beach"]``. Grounding DINO's text threshold then discards phrases
it cannot ground, so a stray adjective costs little.
"""

from __future__ import annotations

import re

# A word list reads better as text than as a list literal.
_FUNCTION_WORDS = frozenset(
    """
    a an the this that these those some any each every all both either neither no another other such i
    me my mine we us our ours you your yours he him his she her hers it its they them their theirs who
    whom whose which what where when why how there here in on at of to from by with without within into
    onto over under above below behind beside besides between among around across along through near
    next against toward towards upon off out up down about after before during inside outside beneath
    beyond via per than like as and or but nor so yet if then because while although though whether also
    too very just only not is are was were be been being am do does did done doing have has had having
    can could will would shall should may might must get gets got let lets make makes made sits sit sat
    stands stand stood looks look looked holds hold held shows show shown appears appear seems seem
    contains contain lies lie lay rides ride rode wears wear wore eats eat ate plays play one two three
    four five six seven eight nine ten several many few lot lots kind sort type image picture photo
    photograph view scene shot describe describes description please
    """.split()  # noqa: SIM905
)
# -ing / -ed words are verbs far more often than nouns in captions; these common nouns are kept.
_KEEP = frozenset("building ceiling clothing painting ring string thing wing bed shed sled red".split())  # noqa: SIM905


def _is_breaker(word: str) -> bool:
    if word in _KEEP:
        return False
    if word in _FUNCTION_WORDS or word.isdigit():
        return True
    return len(word) > 4 and (word.endswith("ing") or word.endswith("ed"))


def extract_noun_phrases(text: str, max_words: int = 3, max_phrases: int = 16) -> list[str]:
    """Noun-phrase-like chunks of `text`, in order of first appearance, without duplicates."""
    phrases: list[str] = []

    def close(run: list[str]) -> None:
        phrase = " ".join(run[-max_words:])
        if run and phrase not in phrases:
            phrases.append(phrase)

    for clause in re.split(r"[^a-z0-9' -]+", text.lower()):
        run: list[str] = []
        for word in [*re.findall(r"[a-z0-9]+(?:'[a-z]+)?", clause), ""]:
            possessor = word.endswith("'s") and not _is_breaker(word[:-2])
            if possessor:  # "the man's hat": "man" is a phrase of its own, "hat" starts the next
                close([*run, word[:-2]])
            elif word and not _is_breaker(word) and "'" not in word:
                run.append(word)
                continue
            else:
                close(run)
            run = []
    return phrases[:max_phrases]


def grounding_prompt(phrases: list[str]) -> str:
    """Grounding DINO's prompt format: lower-case phrases, each ended by ' .'."""
    return " ".join(f"{p} ." for p in phrases)
