"""Image files from untrusted records, opened safely: the image half of ``maven prepare``, and what
inference opens a user's images with (``maven_dist/inference/processor.py``), so both agree.

A bad image raises :class:`RecordRejected` with the reason the rejects file and the counts use:

* **Image paths** are resolved (``..``, absolute paths and symlinks followed) and must stay inside
  ``image_root``, else ``image_outside_root``; the resolved file is opened without following a
  last-component symlink, non-blocking, and must be a regular file of at most ``max_image_bytes``.
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
  would change the pixels and ``image_sizes`` of every tagged photo.
* **Animated / multi-frame images** (GIF, APNG, WebP, MPO, multi-page TIFF) use their first frame,
  as PIL opens them and as LLaVA does; stored bytes decode to that same frame.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from maven_dist.data.image_transform import ImageTransform

IMAGE_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "PPM", "TIFF", "WEBP")
"""The only PIL formats an image file is opened as (JPEG includes MPO); others, e.g. EPS (which runs
Ghostscript), are refused."""
DEFAULT_MAX_IMAGE_SIDE = 8192
"""Longest image side accepted by default (the letterbox square: 8192^2 RGB = 201 MB)."""
DEFAULT_MAX_IMAGE_BYTES = 256 << 20
"""Largest image file accepted by default (bytes)."""


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


def read_image_file(path: Path, max_bytes: int, nofollow: bool = False) -> bytes:
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
    return decode_image(read_image_file(Path(path), max_bytes), Path(path), max_side)


def decode_image(data: bytes, path: Path, max_side: int) -> tuple[Image.Image, bytes, str]:
    """(RGB image, `data`, original mode) of an image file's bytes, or RecordRejected with the reason."""
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
