"""LLaVA JSON/JSONL sources -> checked records: the record-level half of ``maven prepare``.

Every source is parsed in order in the main process and every record checked (malformed JSON line,
encoding, not an object, id, control characters, conversation shape and size, image field, ``<image>``
count, duplicate id: the first occurrence wins); a bad record becomes a :class:`Reject` with its source
file, index/line, id and reason (``docs/data_preparation.md`` lists the reasons). Sources come from the
internet, so nothing in a record is trusted; a bad record is a reject, never a traceback.

* **Text encoding.** Sources must be UTF-8 (RFC 8259; a UTF-8 BOM is skipped). A UTF-16/32 file, or a
  ``.json`` file that does not parse, is a :class:`PrepareError` naming the file. Bytes that are not
  UTF-8 inside a string, and unpaired ``\\uD800``-style surrogate escapes, reject only their record
  (``invalid_utf8``): they are decoded with ``surrogateescape`` and found by the record checks.
* **Control characters** (C0 other than tab/newline/CR, DEL, C1) in an id, a path or a turn reject
  the record (``control_character``; NUL included) rather than being stripped:
  they mark binary garbage or mojibake, and silently editing text would hide that.
* **Size caps**, checked before any tokenization or decoding: ``max_turns`` turns and
  ``max_text_chars`` characters per conversation (``oversized_conversation``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from maven_dist.contract.vocab import IMAGE_PLACEHOLDER
from maven_dist.data.templates import ConversationError, check_turns

REASONS = (
    "malformed_json",
    "invalid_utf8",
    "not_an_object",
    "missing_id",
    "duplicate_id",
    "control_character",
    "empty_conversation",
    "bad_turn",
    "oversized_conversation",
    "non_alternating",
    "unknown_role",
    "non_string_value",
    "empty_answer",
    "bad_image_field",
    "image_count_mismatch",
    "special_token",
    "too_long",
    "image_outside_root",
    "missing_image",
    "empty_image",
    "image_too_large",
    "unreadable_image",
    "truncated_image",
    "unsupported_mode",
)
"""Every reason a record can be rejected for (the ``reason`` field of rejects.jsonl)."""

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
"""C0 controls other than tab, newline and CR; DEL; C1 controls."""
_SURROGATE = re.compile("[\ud800-\udfff]")
"""What non-UTF-8 bytes (decoded with surrogateescape) and unpaired \\uXXXX escapes become."""
MAX_TURNS, MAX_TEXT_CHARS = 1024, 262_144
"""Default caps on a conversation's turns and characters (all turns), checked before tokenizing."""


class PrepareError(RuntimeError):
    """Preparation cannot go on: a source is unreadable, or --strict met a bad record."""


@dataclass(frozen=True)
class Reject:
    source: str
    index: int
    """0-based record index in a JSON list, or 0-based line index in a JSONL file."""
    id: str | None
    reason: str
    message: str
    line: int | None = None
    """1-based line number for JSONL sources."""

    def describe(self) -> str:
        where = f"line {self.line}" if self.line is not None else f"record {self.index}"
        return f"{self.source} {where} (id {self.id!r}): {self.reason}: {self.message}"


@dataclass
class Record:
    source: str
    index: int
    line: int | None
    id: str
    images: list[str]
    conversations: list[dict]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_PARSE_ERRORS = (ValueError, RecursionError)
"""What json.loads raises for bad input: JSONDecodeError, the int-digits limit, nesting too deep."""


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _text_problem(text: str, what: str) -> tuple[str, str] | None:
    """(reason, message) if `text` cannot be stored and tokenized as the text it claims to be."""
    bad = _SURROGATE.search(text)
    if bad is not None:
        code = ord(bad.group())
        detail = f"byte 0x{code - 0xDC00:02x}" if code >= 0xDC80 else f"unpaired surrogate \\u{code:04x}"
        return "invalid_utf8", f"{what} is not valid UTF-8 ({detail} at character {bad.start()})"
    bad = _CONTROL.search(text)
    if bad is not None:
        return (
            "control_character",
            f"{what} has control character U+{ord(bad.group()):04X} at character {bad.start()}",
        )
    return None


def _check_encoding(path: Path, head: bytes) -> None:
    encoding = json.detect_encoding(head)
    if encoding not in ("utf-8", "utf-8-sig"):
        raise PrepareError(
            f"{path}: looks {encoding.upper()}-encoded; LLaVA sources must be UTF-8 "
            f"(convert it, e.g. iconv -f {encoding.upper()} -t UTF-8)"
        )


def _iter_raw(path: Path) -> Iterator[tuple[int, int | None, object, tuple[str, str] | None]]:
    """(index, line, parsed value or None, (reason, message) or None) for each record of a source.

    Text is decoded with ``surrogateescape``: a byte that is not UTF-8 inside a JSON string becomes a
    lone surrogate that the record checks reject (``invalid_utf8``), so it costs only its record.
    """
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for index, raw in enumerate(f):  # binary: lines end at b"\n" only
                if index == 0:
                    _check_encoding(path, raw[:4])
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                if not raw.strip():
                    continue  # blank lines are not records
                text = raw.decode("utf-8", "surrogateescape")
                try:
                    value, error = json.loads(text), None
                except _PARSE_ERRORS as err:
                    value, error = None, _text_problem(text, "line") or ("malformed_json", str(err))
                yield index, index + 1, value, error
        return
    data = path.read_bytes()
    _check_encoding(path, data[:4])
    try:
        value = json.loads(data.decode("utf-8-sig", "surrogateescape"))
    except _PARSE_ERRORS as err:
        raise PrepareError(
            f"{path}: not valid JSON ({err}); a .json source must be one list of records "
            "(use .jsonl with one record per line to have bad lines rejected one by one)"
        ) from err
    if not isinstance(value, list):
        raise PrepareError(f"{path}: top level is {type(value).__name__}, expected a list of records")
    for index, item in enumerate(value):
        yield index, None, item, None


def check_record(
    source: str, index: int, line: int | None, value: object, max_turns: int = MAX_TURNS,
    max_text_chars: int = MAX_TEXT_CHARS,
) -> Record | Reject:  # fmt: skip
    """The record, or why it is rejected."""

    def reject(reason: str, message: str, sample_id: str | None = None) -> Reject:
        return Reject(source, index, sample_id, reason, message, line)

    if not isinstance(value, dict):
        return reject("not_an_object", f"record is {type(value).__name__}, expected a JSON object")
    sample_id = value.get("id")
    if isinstance(sample_id, int) and not isinstance(sample_id, bool):
        sample_id = str(sample_id)
    if not isinstance(sample_id, str) or not sample_id:
        return reject("missing_id", f"record has no usable id (got {_short(value.get('id'))})")
    if problem := _text_problem(sample_id, "id"):
        return reject(*problem, sample_id)
    turns = value.get("conversations")
    if isinstance(turns, list):
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict):
                return reject(
                    "bad_turn",
                    f"turn {k} is {type(turn).__name__}, expected an object with 'from' and 'value'",
                    sample_id,
                )
        if len(turns) > max_turns:
            return reject("oversized_conversation", f"{len(turns)} turns > max_turns {max_turns}", sample_id)
        chars = sum(len(t["value"]) for t in turns if isinstance(t.get("value"), str))
        if chars > max_text_chars:
            return reject(
                "oversized_conversation",
                f"{chars} characters of text > max_text_chars {max_text_chars}",
                sample_id,
            )
    try:
        check_turns(turns)
    except ConversationError as err:
        return reject(err.reason, str(err), sample_id)
    for k, turn in enumerate(turns):
        if problem := _text_problem(turn["value"], f"turn {k} value"):
            return reject(*problem, sample_id)
    image = value.get("image")
    if image is None:
        images = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(p, str) for p in image):
        images = list(image)
    else:
        return reject(
            "bad_image_field", f"'image' is {_short(image)}; expected a path or a list of paths", sample_id
        )
    for k, rel in enumerate(images):
        if not rel:
            return reject("bad_image_field", f"image path {k} is empty", sample_id)
        if problem := _text_problem(rel, f"image path {k} {_short(rel)}"):
            return reject(*problem, sample_id)
    placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if placeholders != len(images):
        return reject(
            "image_count_mismatch",
            f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images",
            sample_id,
        )
    return Record(source, index, line, sample_id, images, turns)


def collect_records(
    sources: Sequence[Path], max_turns: int = MAX_TURNS, max_text_chars: int = MAX_TEXT_CHARS
) -> tuple[list[Record], list[Reject], list[dict]]:
    """Parse and check all sources in order: (kept records, rejects, per-source info)."""
    records: list[Record] = []
    rejects: list[Reject] = []
    infos: list[dict] = []
    first_seen: dict[str, Record] = {}
    names = [Path(p).name for p in sources]
    if len(set(names)) != len(names):
        raise PrepareError(
            f"sources {list(map(str, sources))} share a file name; rejects name sources by file name"
        )
    for path in sources:
        path = Path(path)
        if not path.exists():
            raise PrepareError(f"source {path} does not exist")
        if not path.is_file():
            raise PrepareError(f"source {path} is not a regular file")
        count = 0
        try:
            for index, line, value, error in _iter_raw(path):
                count += 1
                if error is not None:
                    rejects.append(Reject(path.name, index, None, *error, line))
                    continue
                checked = check_record(path.name, index, line, value, max_turns, max_text_chars)
                if isinstance(checked, Record) and checked.id in first_seen:
                    first = first_seen[checked.id]
                    where = f"line {first.line}" if first.line is not None else f"record {first.index}"
                    checked = Reject(
                        path.name,
                        index,
                        checked.id,
                        "duplicate_id",
                        f"id first seen in {first.source} {where}",
                        line,
                    )
                if isinstance(checked, Reject):
                    rejects.append(checked)
                else:
                    first_seen[checked.id] = checked
                    records.append(checked)
            sha256 = sha256_file(path)
        except OSError as err:
            raise PrepareError(f"source {path} cannot be read ({err.strerror or err})") from err
        infos.append({"path": str(path), "sha256": sha256, "records": count})
    return records, rejects, infos
