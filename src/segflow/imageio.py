"""Reading images and index masks with errors that name the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from segflow.errors import SegflowError


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()  # forces a full decode so truncated files fail here, not later in a worker
    except FileNotFoundError:
        raise SegflowError(f"{path}: file not found.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SegflowError(f"{path}: cannot decode image ({exc}). Is the file corrupt or truncated?") from None
    return img


def read_image(path: Path | str) -> np.ndarray:
    """HxWx3 uint8 RGB; grayscale, palette and RGBA images are converted (alpha is dropped)."""
    img = _open(Path(path))
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if img.mode == "P" else img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays


def read_mask(path: Path | str) -> np.ndarray:
    """HxW uint8 index mask. Palette PNGs give their indices, not their colours."""
    path = Path(path)
    img = _open(path)
    if img.mode in ("P", "L"):
        arr = np.array(img)
    elif img.mode in ("I", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(img).astype(np.int64)
        if arr.max(initial=0) > 255:
            raise SegflowError(f"{path}: mask values up to {arr.max()} do not fit an 8-bit index mask.")
    else:
        raise SegflowError(
            f"{path}: a mask must be a single-channel index image (mode L or P), found mode {img.mode}."
        )
    return arr.astype(np.uint8)


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) after a full decode, so corrupt files are caught."""
    img = _open(Path(path))
    return img.size


def write_mask(path: Path | str, mask: np.ndarray) -> None:
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").save(path)


def write_image(path: Path | str, image: np.ndarray) -> None:
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path)


def content_hash(image: np.ndarray) -> str:
    """Hash of decoded pixels, so the same picture saved twice (or re-encoded losslessly) is caught."""
    h = hashlib.sha1(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()
