"""LLaVA JSON/JSONL + image root -> validated Arrow shards, ``manifest.json`` and ``rejects.jsonl``.

Two phases. The main process parses every source in order and applies the record-level checks
(malformed JSON line, not an object, id, conversation shape, image field, ``<image>`` count, duplicate
id: the first occurrence wins); these are cheap and the duplicate check needs the global order. The
surviving records are cut, in input order, into shards of ``shard_size`` records, and worker
processes handle whole shards: open and check every image (missing, empty, unreadable, truncated;
non-RGB modes converted and counted), render the conversation with the template to measure its
length with images expanded, and write the shard.

Every record ends up either in a shard or in ``rejects.jsonl`` with its source file, index/line, id
and reason; ``manifest.json`` carries the counts. Each shard is written atomically beside a sidecar
``shard-NNNNN.json`` holding a fingerprint of its input records and options; a re-run skips shards
whose sidecar matches, so an interrupted preparation resumes, and the output is byte-identical
whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from maven_dist.contract.lengths import visual_tokens_per_image
from maven_dist.contract.vocab import IMAGE_PLACEHOLDER
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
    "not_an_object",
    "missing_id",
    "duplicate_id",
    "empty_conversation",
    "non_alternating",
    "unknown_role",
    "non_string_value",
    "bad_image_field",
    "image_count_mismatch",
    "missing_image",
    "empty_image",
    "unreadable_image",
    "truncated_image",
    "too_long",
)
"""Every reason a record can be rejected for (the ``reason`` field of rejects.jsonl)."""


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
        d["tokenizer"] = _tokenizer_hash(Path(self.tokenizer_dir))
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


def _tokenizer_hash(tokenizer_dir: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(tokenizer_dir.glob("*.json")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Phase 1: records (main process)
# ---------------------------------------------------------------------------------------------


def _iter_raw(path: Path) -> Iterator[tuple[int, int | None, object, str | None]]:
    """(index, line, parsed value or None, JSON error or None) for each record of a source file."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for index, text in enumerate(f):
                if not text.strip():
                    continue  # blank lines are not records
                try:
                    yield index, index + 1, json.loads(text), None
                except json.JSONDecodeError as err:
                    yield index, index + 1, None, str(err)
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PrepareError(
            f"{path}: not valid JSON ({err}); a .json source must be one list of records "
            "(use .jsonl with one record per line to have bad lines rejected one by one)"
        ) from err
    if not isinstance(data, list):
        raise PrepareError(f"{path}: top level is {type(data).__name__}, expected a list of records")
    for index, value in enumerate(data):
        yield index, None, value, None


def _check_record(source: str, index: int, line: int | None, value: object) -> Record | Reject:
    def reject(reason: str, message: str, sample_id: str | None = None) -> Reject:
        return Reject(source, index, sample_id, reason, message, line)

    if not isinstance(value, dict):
        return reject("not_an_object", f"record is {type(value).__name__}, expected a JSON object")
    sample_id = value.get("id")
    if isinstance(sample_id, int) and not isinstance(sample_id, bool):
        sample_id = str(sample_id)
    if not isinstance(sample_id, str) or not sample_id:
        return reject("missing_id", f"record has no usable id (got {value.get('id')!r})")
    try:
        check_turns(value.get("conversations"))
    except ConversationError as err:
        return reject(err.reason, str(err), sample_id)
    image = value.get("image")
    if image is None:
        images = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(p, str) for p in image):
        images = list(image)
    else:
        return reject(
            "bad_image_field", f"'image' is {image!r}; expected a path or a list of paths", sample_id
        )
    placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in value["conversations"])
    if placeholders != len(images):
        return reject(
            "image_count_mismatch",
            f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images",
            sample_id,
        )
    return Record(source, index, line, sample_id, images, value["conversations"])


def collect_records(sources: Sequence[Path]) -> tuple[list[Record], list[Reject], list[dict]]:
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
        if not path.is_file():
            raise PrepareError(f"source {path} does not exist")
        count = 0
        for index, line, value, error in _iter_raw(path):
            count += 1
            if error is not None:
                rejects.append(Reject(path.name, index, None, "malformed_json", error, line))
                continue
            checked = _check_record(path.name, index, line, value)
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
        infos.append({"path": str(path), "sha256": _sha256_file(path), "records": count})
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


def load_image(path: Path) -> tuple[Image.Image, bytes, str]:
    """(RGB image, original bytes, original mode); raises RecordRejected with the reason."""
    if not path.is_file():
        raise RecordRejected("missing_image", f"image {path} not found")
    data = path.read_bytes()
    if not data:
        raise RecordRejected("empty_image", f"image {path} is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated file only fails here
    except UnidentifiedImageError as err:
        raise RecordRejected(
            "unreadable_image", f"image {path} is not an image format PIL can identify"
        ) from err
    except Image.DecompressionBombError as err:
        raise RecordRejected(
            "unreadable_image", f"image {path} is too large to decode safely ({err})"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        reason = "truncated_image" if "truncat" in str(err).lower() else "unreadable_image"
        raise RecordRejected(reason, f"image {path} cannot be decoded ({err})") from err
    mode = image.mode
    return (image if mode == "RGB" else image.convert("RGB")), data, mode


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


def _init_worker(options: PrepareOptions) -> None:
    from transformers import AutoTokenizer

    _WORKER["tokenizer"] = AutoTokenizer.from_pretrained(str(options.tokenizer_dir))
    _WORKER["options"] = options
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


def _build_shard(task: tuple[int, list[Record], str]) -> ShardResult:
    index, records, fingerprint = task
    options: PrepareOptions = _WORKER["options"]
    tokenizer, transform = _WORKER["tokenizer"], _WORKER["transform"]
    rows: list[dict] = []
    result = ShardResult(index, 0)
    converted: Counter[str] = Counter()
    for rec in records:
        try:
            encoded, originals, sizes, modes = [], [], [], []
            for rel in rec.images:
                image, data, mode = load_image(options.image_root / rel)
                encoded.append(encode_for_shard(image, data, mode, transform, options.image_format))
                originals.append(data)
                sizes.append(list(image.size))
                modes.append(mode)
            length = _measure(rec, options, tokenizer)
            if length > options.max_length:
                raise RecordRejected(
                    "too_long",
                    f"{length} tokens after image expansion ({options.tokens_per_image} per image, "
                    f"template {options.template}) > max_length {options.max_length}",
                )
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
    records, rejects, infos = collect_records(sources)
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
            pool = mp.get_context("fork").Pool(min(options.num_workers, len(tasks)), _init_worker, (options,))
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
