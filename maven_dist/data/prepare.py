"""``maven prepare``: LLaVA JSON/JSONL + image root -> validated Arrow shards, ``manifest.json`` and
``rejects.jsonl``.

Two phases. The main process parses every source in order and checks each record
(:mod:`maven_dist.data.records`: cheap, and the duplicate check needs the global order). The surviving
records are cut, in input order, into shards of ``shard_size`` records, and worker processes handle whole
shards: look for special tokens, render the conversation with the template to measure its length with
images expanded (before any image is opened, so a record with thousands of ``<image>`` costs nothing), then
open and check every image (:mod:`maven_dist.data.images`) and write the shard.

Every record ends up either in a shard or in ``rejects.jsonl`` with its source file, index/line, id and
reason; ``manifest.json`` carries the counts. Each shard is written atomically beside a sidecar
``shard-NNNNN.json`` holding a fingerprint of its input records and options; a re-run skips shards whose
sidecar matches, so an interrupted preparation resumes, and the output is byte-identical whatever the number
of workers.

* **Special tokens.** Text containing a string the tokenizer reads as a special token (``</s>``,
  ``<s>``, ``<unk>``, any added token) or a visual token (``<img>``, ``</img>``, ``<img_00042>``)
  is rejected (``special_token``): rendering would turn it into that token id, not text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
from tqdm import tqdm

from maven_dist.contract.atomic_write import write_json_atomic
from maven_dist.contract.lengths import visual_tokens_per_image
from maven_dist.contract.vocab import IMAGE_PLACEHOLDER, IMG_END, IMG_START
from maven_dist.data.image_transform import ImageTransform
from maven_dist.data.images import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_SIDE,
    RecordRejected,
    decode_image,
    encode_for_shard,
    read_image_file,
    resolve_image_path,
)
from maven_dist.data.records import MAX_TEXT_CHARS, MAX_TURNS, PrepareError, Record, Reject, collect_records
from maven_dist.data.shards import (
    BASE_SCHEMA,
    OPTIONAL_COLUMNS,
    SCHEMA_VERSION,
    shard_name,
    write_shard_atomic,
)
from maven_dist.data.templates import ConversationError, render
from maven_dist.data.workers import worker_context

_VISUAL_TOKEN = re.compile(r"<img_\d{5}>")


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
    max_turns: int = MAX_TURNS
    """Most turns a conversation may have (checked before tokenizing)."""
    max_text_chars: int = MAX_TEXT_CHARS
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


@dataclass
class ShardResult:
    index: int
    rows: int
    rejects: list[Reject] = field(default_factory=list)
    converted_modes: dict[str, int] = field(default_factory=dict)
    images: int = 0
    skipped: bool = False


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
                data = read_image_file(path, options.max_image_bytes, nofollow=True)
                image, data, mode = decode_image(data, path, options.max_image_side)
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
    write_json_atomic(_sidecar(options.out_dir, index), sidecar)
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
    records, rejects, infos = collect_records(sources, options.max_turns, options.max_text_chars)
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
            # Never a fork of this process: the progress bar alone runs a monitor thread (data/workers.py).
            pool = worker_context(["maven_dist.data.prepare"]).Pool(
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
    write_json_atomic(out_dir / "rejects.jsonl", [asdict(r) for r in rejects], lines=True)
    write_json_atomic(out_dir / "manifest.json", {k: v for k, v in manifest.items() if k != "resumed_shards"})
    return manifest
