"""Reading images and index masks with errors that name the file.

Every reader goes through :func:`_open`, so all stages see the same pixels: the picture as a viewer shows it
(EXIF orientation applied, to masks as to images; COCO polygons are drawn on that picture), 16-bit
grayscale scaled to 8 bits, and images larger than PIL's decompression-bomb limit refused before decoding.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segflow.errors import SegflowError

# PIL's own default (about 89.5 megapixels, e.g. 9459x9459): PIL only warns between it and twice it.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)  # reads the header only
    except FileNotFoundError:
        raise SegflowError(f"{path}: file not found.") from None
    except Image.DecompressionBombError as exc:  # PIL refuses past twice its limit, before giving the size
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, f"{int(pixels[1]):,} pixels" if pixels else "too large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _undecodable(path, exc) from None
    if img.width * img.height > MAX_PIXELS:
        img.close()
        raise _too_large(path, f"{img.width}x{img.height} ({img.width * img.height:,} pixels)")
    try:
        img.load()  # forces a full decode so truncated files fail here, not later in a worker
        ImageOps.exif_transpose(img, in_place=True)
    except (OSError, SyntaxError, ValueError) as exc:
        raise _undecodable(path, exc) from None
    return img


def _too_large(path: Path, size: str) -> SegflowError:
    return SegflowError(
        f"{path}: the image is {size}, more than the {MAX_PIXELS:,} pixels segflow decodes (PIL's "
        "decompression-bomb limit); such a file is either a decompression bomb or must be cut into tiles first."
    )


def _undecodable(path: Path, exc: Exception) -> SegflowError:
    return SegflowError(f"{path}: cannot decode image ({exc}). Is the file corrupt or truncated?")


def read_image(path: Path | str) -> np.ndarray:
    """HxWx3 uint8 RGB; grayscale, palette and RGBA images are converted (alpha is dropped), 16-bit grayscale
    keeps its high byte (as PIL reduces 16-bit RGB); 32-bit integer and float images are refused."""
    path = Path(path)
    img = _open(path)
    if img.mode in SIXTEEN_BIT_MODES:
        gray = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("I", "F") or img.mode.startswith("I;"):
        kind = "floating-point" if img.mode == "F" else "signed or 32-bit integer"
        raise SegflowError(
            f"{path}: {kind} pixels (PIL mode {img.mode}) have no standard 8-bit rendering; save the image with "
            "8 or 16 bits per channel (unsigned)."
        )
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if img.mode == "P" else img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays


def read_mask(path: Path | str) -> np.ndarray:
    """HxW uint8 index mask. Palette PNGs give their indices, not their colours; 16-bit masks their values."""
    path = Path(path)
    img = _open(path)
    if img.mode in ("P", "L"):
        arr = np.array(img)
    elif img.mode == "I" or img.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.int64)
        if arr.max(initial=0) > 255:
            raise SegflowError(f"{path}: mask values up to {arr.max()} do not fit an 8-bit index mask.")
    else:
        raise SegflowError(
            f"{path}: a mask must be a single-channel index image (mode L or P), found mode {img.mode}."
        )
    return arr.astype(np.uint8)


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), after a full decode so corrupt files are caught."""
    img = _open(Path(path))
    return img.size


def header_size(path: Path | str | BinaryIO) -> tuple[int, int]:
    """(width, height) from the file's header alone, no pixel decoded (an EXIF rotation does not change their
    product): to refuse an image too large to decode before decoding it. (0, 0) when Pillow cannot read the
    header: :func:`read_image` then says what is wrong with the file."""
    try:
        with Image.open(path) as header:
            return header.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return 0, 0


def write_mask(path: Path | str, mask: np.ndarray, palette: np.ndarray | None = None) -> None:
    """An HxW index mask as PNG: grayscale (mode L), or with a (256, 3) ``palette`` a palette PNG (mode P) that
    an image viewer shows in colour; either way the pixel values are the class indices that :func:`read_mask`
    returns."""
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L")
    if palette is not None:
        img.putpalette(np.ascontiguousarray(palette, dtype=np.uint8).tobytes())  # mode L becomes P, values kept
    img.save(path)


def write_image(path: Path | str, image: np.ndarray) -> None:
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path)


def content_hash(image: np.ndarray) -> str:
    """Hash of decoded pixels, so the same picture saved twice (or re-encoded losslessly) is caught."""
    h = hashlib.sha1(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()
