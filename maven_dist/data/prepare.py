"""LLaVA JSON/JSONL + image root -> validated Arrow shards, ``manifest.json`` and ``rejects.jsonl``.

Two phases. The main process parses every source in order and applies the record-level checks
(malformed JSON line, encoding, not an object, id, control characters, conversation shape and size,
image field, ``<image>`` count, duplicate id: the first occurrence wins); these are cheap and the
duplicate check needs the global order. The surviving records are cut, in input order, into shards
of ``shard_size`` records, and worker processes handle whole shards: look for special tokens, render
the conversation with the template to measure its length with images expanded, then resolve, open
and check every image (outside the root, missing, empty, too large, unreadable, truncated, mode;
non-RGB modes converted and counted), and write the shard.

Every record ends up either in a shard or in ``rejects.jsonl`` with its source file, index/line, id
and reason; ``manifest.json`` carries the counts. Each shard is written atomically beside a sidecar
``shard-NNNNN.json`` holding a fingerprint of its input records and options; a re-run skips shards
whose sidecar matches, so an interrupted preparation resumes, and the output is byte-identical
whatever the number of workers.

Sources come from the internet, so nothing in a record is trusted; a bad record is a reject, never
a traceback, and never a file read from outside the image root. The decisions behind the rules
(``docs/data_preparation.md`` lists the reasons):

* **Image paths** are resolved (``..``, absolute paths and symlinks followed) and must stay inside
  ``image_root``, else ``image_outside_root``; the resolved file is opened without following a
  last-component symlink, non-blocking, and must be a regular file of at most ``max_image_bytes``.
* **Text encoding.** Sources must be UTF-8 (RFC 8259; a UTF-8 BOM is skipped). A UTF-16/32 file, or a
  ``.json`` file that does not parse, is a :class:`PrepareError` naming the file. Bytes that are not
  UTF-8 inside a string, and unpaired ``\\uD800``-style surrogate escapes, reject only their record
  (``invalid_utf8``): they are decoded with ``surrogateescape`` and found by the record checks.
* **Control characters** (C0 other than tab/newline/CR, DEL, C1) in an id, a path or a turn reject
  the record (``control_character``; NUL included) rather than being stripped:
  they mark binary garbage or mojibake, and silently editing text would hide that.
* **Special tokens.** Text containing a string the tokenizer reads as a special token (``</s>``,
  ``<s>``, ``<unk>``, any added token) or a visual token (``<img>``, ``</img>``, ``<img_00042>``)
  is rejected (``special_token``): rendering would turn it into that token id, not text.
* **Size caps**, checked before any tokenization or decoding: ``max_turns`` turns and
  ``max_text_chars`` characters per conversation (``oversized_conversation``); the length check then
  runs before images are opened, so a record with thousands of ``<image>`` costs nothing.
* **Image size.** ``max_image_side`` bounds the longest side (read from the header, before
  decoding): the letterbox makes a square of that side, in preparation (``resize``) and in the
  loader, so a 1 x 60000 image would otherwise allocate 10 GB. Over it, over ``max_image_bytes``, or
  over PIL's own decompression-bomb limit (2 x ``Image.MAX_IMAGE_PIXELS``) is ``image_too_large``.
  PIL refuses zero-width/height headers itself (``unreadable_image``).
* **Formats.** Only :data:`IMAGE_FORMATS` are opened (JPEG/MPO, PNG/APNG, GIF, WebP, BMP, TIFF, PPM);
  others (EPS, which would run Ghostscript, and PIL's exotic decoders) are ``unreadable_image``.
* **Modes** become RGB deterministically: 16-bit grey (``I;16*``) is scaled to 8 bits
  (``round(v * 255 / 65535)``; PIL's own conversion clips, turning most of the image white);
  32-bit integer and float images (``I``, ``F``) have no defined range and are rejected
  (``unsupported_mode``); everything else (L, 1, P, LA, PA, RGBA, CMYK, YCbCr, ...) is PIL's
  ``convert("RGB")`` (alpha dropped, as LLaVA does).
* **EXIF orientation is not applied**: the pixels are used as stored, as LLaVA's loader does; the
  COCO and Visual Genome annotations (boxes, masks, the GPT-4 conversations written from them) are in
  that frame (they were drawn in 2014-2016, before browsers applied the tag by default). Applying it
  would change the pixels and ``image_sizes`` of every tagged photo. ``load_image`` is also what
  inference uses (``maven_dist/inference/processor.py``), so training and inference agree.
* **Animated / multi-frame images** (GIF, APNG, WebP, MPO, multi-page TIFF) use their first frame,
  as PIL opens them and as LLaVA does; stored bytes decode to that same frame.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import signal
import stat
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from maven_dist.contract.lengths import visual_tokens_per_image
from maven_dist.contract.vocab import IMAGE_PLACEHOLDER, IMG_END, IMG_START
from maven_dist.data.image_transform import ImageTransform
from maven_dist.data.shards import (
    BASE_SCHEMA,
    OPTIONAL_COLUMNS,
    SCHEMA_VERSION,
    shard_name,
    write_shard_atomic,
)
from maven_dist.data.templates import ConversationError, check_turns, render

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

IMAGE_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "PPM", "TIFF", "WEBP")
"""The only PIL formats an image file is opened as (JPEG includes MPO); others, e.g. EPS (which runs
Ghostscript), are refused."""
DEFAULT_MAX_IMAGE_SIDE = 8192
"""Longest image side accepted by default (the letterbox square: 8192^2 RGB = 201 MB)."""
DEFAULT_MAX_IMAGE_BYTES = 256 << 20
"""Largest image file accepted by default (bytes)."""

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
"""C0 controls other than tab, newline and CR; DEL; C1 controls."""
_SURROGATE = re.compile("[\ud800-\udfff]")
"""What non-UTF-8 bytes (decoded with surrogateescape) and unpaired \\uXXXX escapes become."""
_VISUAL_TOKEN = re.compile(r"<img_\d{5}>")


class PrepareError(RuntimeError):
    """Preparation cannot go on: a source is unreadable, or --strict met a bad record."""


@dataclass
class PrepareOptions:
    image_root: Path
    """Directory the records' ``image`` paths are relative to."""
    out_dir: Path
    """Where shards, manifest.json and rejects.jsonl go."""
    tokenizer_dir: Path
    """HF tokenizer directory used to measure sample lengths."""
    template: str = "vicuna_v1"
    """Conversation template used for the length check."""
    max_length: int = 2048
    """Longest allowed sequence after image expansion."""
    max_turns: int = 1024
    """Most turns a conversation may have (checked before tokenizing)."""
    max_text_chars: int = 262_144
    """Most characters, all turns together, a conversation may have (checked before tokenizing)."""
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE
    """Longest image side accepted, read from the header before decoding."""
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    """Largest image file accepted."""
    num_codes: int = 32
    """Discrete codes per image (discrete view length = num_codes + 2)."""
    num_patches: int = 576
    """Continuous patches per image before reduction."""
    keep_ratio: float = 0.25
    """Fraction of patches kept by the selector."""
    views: tuple[str, ...] = ("discrete", "continuous")
    """Views counted per image for the length check (both = the longest case)."""
    resize: int = 0
    """If > 0, store each image letterboxed and resized to this square side (what the tower sees)."""
    pad_mean: tuple[float, float, float] | None = None
    """Letterbox fill colour as the tower's normalisation mean; None = CLIP's."""
    keep_original: bool = False
    """Also store the original image bytes (column ``original_images``)."""
    image_format: Literal["png", "ppm"] = "png"
    """Encoding of re-encoded images: png (compact) or ppm (uncompressed RGB, decodes ~10x faster)."""
    shard_size: int = 1024
    """Records per shard (counted before image checks, so shard boundaries are stable)."""
    num_workers: int = 2
    """Worker processes; 0 runs everything in this process."""
    strict: bool = False
    """Stop at the first bad record with its message instead of recording it."""
    progress: bool | None = None
    """Show a progress bar; None = only on a terminal."""

    def fingerprint(self) -> dict:
        """What changes shard contents (not where they go, nor how many workers write them)."""
        d = asdict(self)
        for volatile in ("out_dir", "num_workers", "strict", "progress"):
            d.pop(volatile)
        d["tokenizer"] = tokenizer_hash(Path(self.tokenizer_dir))
        return json.loads(json.dumps(d, default=str))

    @property
    def tokens_per_image(self) -> int:
        return visual_tokens_per_image(self.num_codes, self.num_patches, self.keep_ratio, self.views)


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


@dataclass
class ShardResult:
    index: int
    rows: int
    rejects: list[Reject] = field(default_factory=list)
    converted_modes: dict[str, int] = field(default_factory=dict)
    images: int = 0
    skipped: bool = False


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")  # fmt: skip


def tokenizer_hash(tokenizer_dir: Path) -> str:
    """What identifies a tokenizer (recorded in the shards' manifest): its own files only, so an LLM
    directory's model config (Vicuna-7B vs -13B, same tokenizer) does not count."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = tokenizer_dir / name
        if path.is_file():
            h.update(name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Phase 1: records (main process)
# ---------------------------------------------------------------------------------------------


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


def _check_record(
    source: str, index: int, line: int | None, value: object, limits: PrepareOptions | None = None
) -> Record | Reject:
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
        max_turns = limits.max_turns if limits else PrepareOptions.max_turns
        max_chars = limits.max_text_chars if limits else PrepareOptions.max_text_chars
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
        if chars > max_chars:
            return reject(
                "oversized_conversation",
                f"{chars} characters of text > max_text_chars {max_chars}",
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
    sources: Sequence[Path], limits: PrepareOptions | None = None
) -> tuple[list[Record], list[Reject], list[dict]]:
    """Parse and check all sources in order: (kept records, rejects, per-source info).

    `limits` gives ``max_turns`` and ``max_text_chars`` (the defaults of PrepareOptions without)."""
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
                checked = _check_record(path.name, index, line, value, limits)
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
            sha256 = _sha256_file(path)
        except OSError as err:
            raise PrepareError(f"source {path} cannot be read ({err.strerror or err})") from err
        infos.append({"path": str(path), "sha256": sha256, "records": count})
    return records, rejects, infos


# ---------------------------------------------------------------------------------------------
# Phase 2: shards (workers)
# ---------------------------------------------------------------------------------------------


class RecordRejected(Exception):
    """A record (or an image of it) that cannot be used; ``reason`` is the short code the rejects file
    and the counts use. ``load_image`` raises it for images, also outside preparation (inference)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def resolve_image_path(image_root: Path, rel: str) -> Path:
    """The real path of `rel` under `image_root`; RecordRejected("image_outside_root") if it leads out.

    Everything is resolved (``..``, an absolute `rel`, symlinks anywhere on the way, also dangling
    ones), so no record can make preparation read a file outside the root.
    """
    root = os.path.realpath(image_root)
    joined = os.path.join(root, rel)
    try:
        real = os.path.realpath(joined)
    except (OSError, ValueError) as err:
        raise RecordRejected("unreadable_image", f"image path {rel!r} cannot be resolved ({err})") from err
    if os.path.commonpath([root, real]) != root:
        if os.path.isabs(rel):
            how = "an absolute path"
        elif os.path.commonpath([root, os.path.normpath(joined)]) != root:
            how = "'..' leads out"
        else:
            how = "a symlink leads out"
        raise RecordRejected(
            "image_outside_root",
            f"image path {rel!r} resolves to {real}, outside the image root {root} ({how})",
        )
    return Path(real)


def _read_image_file(path: Path, max_bytes: int, nofollow: bool = False) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (opened non-blocking: a FIFO cannot hang us)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if nofollow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as err:
        raise RecordRejected("missing_image", f"image {path} not found") from err
    except (OSError, ValueError) as err:
        raise RecordRejected("unreadable_image", f"image {path} cannot be opened ({err})") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise RecordRejected("unreadable_image", f"image {path} is {kind}")
        if info.st_size > max_bytes:
            raise RecordRejected(
                "image_too_large", f"image {path} is {info.st_size} bytes > max_image_bytes {max_bytes}"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise RecordRejected("unreadable_image", f"image {path} cannot be read ({err})") from err
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise RecordRejected("image_too_large", f"image {path} is over max_image_bytes {max_bytes}")
    return data


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """RGB pixels of a decoded image, deterministically (see the module docstring, *Modes*)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16"):
        levels = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((levels * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if mode in ("I", "F"):
        raise RecordRejected(
            "unsupported_mode",
            f"image {path} has mode {mode} ({'32-bit integer' if mode == 'I' else 'float'} pixels), "
            "which has no defined range; store it as 8- or 16-bit",
        )
    return image.convert("RGB")


def load_image(
    path: Path, *, max_side: int = DEFAULT_MAX_IMAGE_SIDE, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> tuple[Image.Image, bytes, str]:
    """(RGB image, original bytes, original mode); raises RecordRejected with the reason.

    `max_side` and `max_bytes` bound what is decoded (preparation passes its options' limits)."""
    return _decode_image(_read_image_file(Path(path), max_bytes), Path(path), max_side)


def _decode_image(data: bytes, path: Path, max_side: int) -> tuple[Image.Image, bytes, str]:
    if not data:
        raise RecordRejected("empty_image", f"image {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # our own limit decides; PIL's warning would only be noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError as err:
        raise RecordRejected(
            "unreadable_image",
            f"image {path} is not an image in an accepted format ({', '.join(IMAGE_FORMATS)})",
        ) from err
    except Image.DecompressionBombError as err:
        raise RecordRejected(
            "image_too_large", f"image {path} is too large to decode safely ({err})"
        ) from err
    except Exception as err:  # a malformed header can make a PIL plugin raise anything
        raise RecordRejected(
            "unreadable_image", f"image {path} cannot be decoded ({type(err).__name__}: {err})"
        ) from err
    width, height = image.size
    if not width or not height:
        raise RecordRejected("unreadable_image", f"image {path} is {width} x {height} pixels")
    if max(width, height) > max_side:
        raise RecordRejected(
            "image_too_large", f"image {path} is {width} x {height} pixels; max_image_side is {max_side}"
        )
    try:
        image.load()  # decode now: a truncated file only fails here
    except Exception as err:
        reason = "truncated_image" if "truncat" in str(err).lower() else "unreadable_image"
        raise RecordRejected(reason, f"image {path} cannot be decoded ({type(err).__name__}: {err})") from err
    mode = image.mode
    try:
        rgb = _to_rgb(image, path)
    except RecordRejected:
        raise
    except Exception as err:
        raise RecordRejected(
            "unsupported_mode", f"image {path} of mode {mode} cannot be converted to RGB ({err})"
        ) from err
    return rgb, data, mode


def encode_for_shard(
    image: Image.Image, data: bytes, mode: str, transform: ImageTransform | None, image_format: str = "png"
) -> bytes:
    """Bytes stored in the ``images`` column; decoding them gives exactly the pixels the tower sees.

    With a transform, the image is letterboxed and resized exactly as ``ImageTransform`` would, so the
    loader's transform is a pure normalisation; PNG keeps it lossless. Without, RGB PNG/JPEG files
    are stored as they are and anything else is re-encoded as RGB PNG. ``image_format="ppm"`` stores
    re-encoded images uncompressed: PIL "decodes" PPM with a copy, which is what makes the loader
    fast when images are pre-resized (PNG decoding dominated its profile), at ~3 bytes per pixel.
    """
    if transform is not None:
        square = transform.pad_to_square(image)
        if square.size != (transform.image_size, transform.image_size):
            square = square.resize((transform.image_size, transform.image_size), Image.Resampling.BICUBIC)
        image = square
    elif mode == "RGB" and (data.startswith(b"\x89PNG\r\n\x1a\n") or data.startswith(b"\xff\xd8\xff")):
        return data
    out = io.BytesIO()
    if image_format == "ppm":
        image.save(out, format="PPM")
    else:
        image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


_WORKER: dict = {}


def _init_pool_worker(options: PrepareOptions) -> None:
    # Pool.terminate() ends the workers with SIGTERM. A worker forked from a process whose SIGTERM
    # handler only records the signal (the trainer's preemption handler, or any caller's) would live
    # on, and terminate() would wait for it forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(options)


def _init_worker(options: PrepareOptions) -> None:
    from maven_dist.data.tokenizer import load_text_tokenizer

    tokenizer = load_text_tokenizer(options.tokenizer_dir)
    _WORKER["tokenizer"] = tokenizer
    _WORKER["options"] = options
    _WORKER["special"] = special_token_pattern(tokenizer)
    _WORKER["root"] = os.path.realpath(options.image_root)
    transform = None
    if options.resize:
        transform = (
            ImageTransform(options.resize)
            if options.pad_mean is None
            else ImageTransform(options.resize, tuple(options.pad_mean))
        )
    _WORKER["transform"] = transform


def _sidecar(out_dir: Path, index: int) -> Path:
    return out_dir / shard_name(index).replace(".arrow", ".json")


def _shard_fingerprint(records: list[Record], options: PrepareOptions) -> str:
    payload = json.dumps([asdict(r) for r in records] + [options.fingerprint()], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _write_json_atomic(obj: object, path: Path, lines: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    text = "".join(json.dumps(o) + "\n" for o in obj) if lines else json.dumps(obj, indent=1) + "\n"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _measure(rec: Record, options: PrepareOptions, tokenizer) -> int:
    """Sequence length with images expanded, as the stage views will render the record."""
    turns = rec.conversations
    if options.template == "plain":
        # `plain` (stages 2-3) renders only the first round, so its images must all be asked about there.
        turns = turns[:2]
        asked = turns[0]["value"].count(IMAGE_PLACEHOLDER)
        if asked != len(rec.images):
            raise RecordRejected(
                "image_count_mismatch",
                f"template plain uses the first round, which has {asked} {IMAGE_PLACEHOLDER} of {len(rec.images)} images",
            )
    return render(turns, options.template, tokenizer).expanded_length(options.tokens_per_image)


def special_token_pattern(tokenizer) -> re.Pattern[str]:
    """Strings that rendering would turn into a special or visual token instead of text."""
    specials = {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab(), IMG_START, IMG_END}
    specials = {t for t in specials if t and t != IMAGE_PLACEHOLDER and not _VISUAL_TOKEN.fullmatch(t)}
    alternatives = [re.escape(t) for t in sorted(specials, key=lambda t: (-len(t), t))]
    return re.compile("|".join([*alternatives, _VISUAL_TOKEN.pattern]))


def _check_special_tokens(rec: Record, pattern: re.Pattern[str]) -> None:
    for k, turn in enumerate(rec.conversations):
        found = pattern.search(turn["value"])
        if found is not None:
            raise RecordRejected(
                "special_token",
                f"turn {k} value contains {found.group()!r} at character {found.start()}, which the "
                "tokenizer reads as a special token, not as text",
            )


def _build_shard(task: tuple[int, list[Record], str]) -> ShardResult:
    index, records, fingerprint = task
    options: PrepareOptions = _WORKER["options"]
    tokenizer, transform = _WORKER["tokenizer"], _WORKER["transform"]
    rows: list[dict] = []
    result = ShardResult(index, 0)
    converted: Counter[str] = Counter()
    for rec in records:
        try:
            # Text first: it is cheap, and bounds the images a record can make us decode.
            _check_special_tokens(rec, _WORKER["special"])
            length = _measure(rec, options, tokenizer)
            if length > options.max_length:
                raise RecordRejected(
                    "too_long",
                    f"{length} tokens after image expansion ({options.tokens_per_image} per image, "
                    f"template {options.template}) > max_length {options.max_length}",
                )
            encoded, originals, sizes, modes = [], [], [], []
            for rel in rec.images:
                path = resolve_image_path(_WORKER["root"], rel)
                data = _read_image_file(path, options.max_image_bytes, nofollow=True)
                image, data, mode = _decode_image(data, path, options.max_image_side)
                encoded.append(encode_for_shard(image, data, mode, transform, options.image_format))
                originals.append(data)
                sizes.append(list(image.size))
                modes.append(mode)
        except (RecordRejected, ConversationError) as err:
            reject = Reject(rec.source, rec.index, rec.id, err.reason, str(err), rec.line)
            if options.strict:
                raise PrepareError(f"--strict: {reject.describe()}") from None
            result.rejects.append(reject)
            continue
        converted.update(m for m in modes if m != "RGB")
        row = {
            "id": rec.id,
            "source": rec.source,
            "source_index": rec.index,
            "conversations": [{"from": t["from"], "value": t["value"]} for t in rec.conversations],
            "image_paths": rec.images,
            "images": encoded,
            "image_sizes": sizes,
            "num_tokens": length,
        }
        if options.keep_original:
            row["original_images"] = originals
        rows.append(row)
    schema = (
        BASE_SCHEMA.append(pa.field("original_images", OPTIONAL_COLUMNS["original_images"]))
        if (options.keep_original)
        else BASE_SCHEMA
    )
    schema = schema.with_metadata({"schema_version": str(SCHEMA_VERSION)})
    write_shard_atomic(pa.Table.from_pylist(rows, schema=schema), options.out_dir / shard_name(index))
    result.rows, result.images = len(rows), sum(len(r["images"]) for r in rows)
    result.converted_modes = dict(sorted(converted.items()))
    sidecar = {"fingerprint": fingerprint, **asdict(result)}
    sidecar.pop("skipped")
    _write_json_atomic(sidecar, _sidecar(options.out_dir, index))
    return result


def _finished(out_dir: Path, index: int, fingerprint: str) -> ShardResult | None:
    """The recorded result of a shard that an earlier run completed with the same inputs, if any."""
    path = _sidecar(out_dir, index)
    if not path.is_file() or not (out_dir / shard_name(index)).is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    return ShardResult(
        index,
        meta["rows"],
        [Reject(**r) for r in meta["rejects"]],
        meta["converted_modes"],
        meta["images"],
        True,
    )


def prepare(sources: Sequence[Path], options: PrepareOptions) -> dict:
    """Convert `sources` into shards under ``options.out_dir``; returns the manifest (also written)."""
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options.image_root = Path(options.image_root)
    if not Path(options.tokenizer_dir).is_dir():
        raise PrepareError(f"tokenizer directory {options.tokenizer_dir} does not exist")
    records, rejects, infos = collect_records(sources, options)
    if any(r.images for r in records) and not options.image_root.is_dir():
        raise PrepareError(f"image root {options.image_root} is not a directory")
    if options.strict and rejects:
        raise PrepareError(f"--strict: {rejects[0].describe()}")

    chunks = [records[i : i + options.shard_size] for i in range(0, len(records), options.shard_size)]
    tasks, results = [], []
    for index, chunk in enumerate(chunks):
        fingerprint = _shard_fingerprint(chunk, options)
        done = _finished(out_dir, index, fingerprint)
        if done is not None:
            results.append(done)
        else:
            tasks.append((index, chunk, fingerprint))
    # Shards beyond the new count belong to an earlier, larger input: remove them.
    for stale in out_dir.glob("shard-*.arrow"):
        if int(stale.stem.split("-")[1]) >= len(chunks):
            stale.unlink()
            _sidecar(out_dir, int(stale.stem.split("-")[1])).unlink(missing_ok=True)

    disable = None if options.progress is None else not options.progress
    with tqdm(total=len(records), unit="sample", desc="prepare", disable=disable) as bar:
        bar.update(sum(len(chunks[r.index]) for r in results))
        if options.num_workers == 0 or len(tasks) <= 1:
            _init_worker(options)
            outputs = map(_build_shard, tasks)
            pool = None
        else:
            # fork: workers inherit the imported modules; this process has not started tokenizers' threads.
            pool = mp.get_context("fork").Pool(
                min(options.num_workers, len(tasks)), _init_pool_worker, (options,)
            )
            outputs = pool.imap(_build_shard, tasks)
        try:
            for result in outputs:
                results.append(result)
                bar.update(len(chunks[result.index]))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()

    results.sort(key=lambda r: r.index)
    source_order = {Path(info["path"]).name: k for k, info in enumerate(infos)}
    rejects += [rej for r in results for rej in r.rejects]
    rejects.sort(key=lambda r: (source_order[r.source], r.index))
    converted: Counter[str] = Counter()
    for r in results:
        converted.update(r.converted_modes)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "sources": infos,
        "image_root": str(options.image_root),
        "options": options.fingerprint(),
        "counts": {
            "records": sum(i["records"] for i in infos),
            "kept": sum(r.rows for r in results),
            "rejected": len(rejects),
            "rejected_by_reason": dict(sorted(Counter(r.reason for r in rejects).items())),
            "converted_modes": dict(sorted(converted.items())),
            "images": sum(r.images for r in results),
        },
        "shards": [{"name": shard_name(r.index), "rows": r.rows} for r in results],
        "rejects_file": "rejects.jsonl",
        "resumed_shards": sum(r.skipped for r in results),
    }
    _write_json_atomic(
        [{k: v for k, v in asdict(r).items()} for r in rejects], out_dir / "rejects.jsonl", lines=True
    )
    _write_json_atomic(
        {k: v for k, v in manifest.items() if k != "resumed_shards"}, out_dir / "manifest.json"
    )
    return manifest
