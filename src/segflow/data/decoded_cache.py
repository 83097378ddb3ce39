"""The decoded-image cache: each ingested image and mask decoded once, kept as uint8 arrays for training.

Training reads every image once per epoch, and decoding a PNG or JPEG costs more than the rest of a sample's
preparation. ``segflow cache`` (a DVC stage whose one output is the folder) decodes them once and writes:

- ``shard-NNN.npy``: flat uint8 arrays holding, image after image in manifest order, the HxWx3 RGB bytes and
  then, for a labeled image, the HxW mask bytes; at most ``shard_bytes`` each (an image never spans two).
  They are opened with ``np.load(mmap_mode="r")``: only the pages read are loaded, and the DataLoader's worker
  processes share them through the page cache.
- ``index.json``: the SHA-256 of every file of the ingested data it was built from (manifest, images, masks:
  a cache of other data is stale, even when only a mask changed), the shards with their sizes, and per image
  its shard, offset, height, width and whether a mask follows.

Arrays keep their decoded size (no resizing): the cache returns exactly what decoding returns, so training
computes the same numbers with or without it. No pickle anywhere (``allow_pickle=False``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segflow.data.fingerprint import differences, ingested_sha256
from segflow.errors import SegflowError

CACHE_DIR = Path("data/cache")  # where `segflow cache` writes and training reads, relative to the project
INDEX_FILE = "index.json"
FORMAT = 2
SHARD_BYTES = 1 << 30
REBUILD = "rebuild it with `segflow cache` (or `dvc repro cache`)"


@dataclass(frozen=True)
class Entry:
    """Where one image (and its mask, right after it) lies in the shards."""

    image_id: str
    shard: int
    offset: int
    height: int
    width: int
    labeled: bool

    @property
    def image_bytes(self) -> int:
        return self.height * self.width * 3

    @property
    def nbytes(self) -> int:
        return self.image_bytes + (self.height * self.width if self.labeled else 0)


def shard_name(number: int) -> str:
    return f"shard-{number:03d}.npy"


class DecodedCache:
    """Read side of the cache (see the module docstring); open it with :func:`open_cache`."""

    def __init__(self, cache_dir: Path, entries: list[Entry], shard_files: list[tuple[str, int]]) -> None:
        self.cache_dir = Path(cache_dir)
        self.entries = {entry.image_id: entry for entry in entries}
        self.shard_files = shard_files
        self._shards: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict[str, Any]:
        # Sent to spawned DataLoader workers: they map the shards themselves rather than receive their bytes.
        return {**self.__dict__, "_shards": None}

    def shards(self) -> list[np.ndarray]:
        if self._shards is None:
            self._shards = [self._map(name, size) for name, size in self.shard_files]
        return self._shards

    def _map(self, name: str, size: int) -> np.ndarray:
        path = self.cache_dir / name
        try:
            shard = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise SegflowError(f"{path}: shard of the decoded-image cache is missing; {REBUILD}.") from None
        except (ValueError, OSError) as exc:
            raise SegflowError(f"{path}: not a readable .npy shard ({exc}); {REBUILD}.") from None
        if shard.dtype != np.uint8 or shard.shape != (size,):
            raise SegflowError(f"{path}: holds {shard.dtype} {shard.shape}, {self.cache_dir / INDEX_FILE} says uint8 "
                               f"({size},); {REBUILD}.")
        return shard

    def _entry(self, image_id: str) -> Entry:
        try:
            return self.entries[image_id]
        except KeyError:
            raise SegflowError(f"{self.cache_dir}: image {image_id!r} is not in the decoded-image cache; "
                               f"{REBUILD}.") from None

    def image(self, image_id: str) -> np.ndarray:
        """HxWx3 uint8, as :func:`segflow.data.imageio.read_image` returns it (a writable copy)."""
        entry = self._entry(image_id)
        flat = self.shards()[entry.shard][entry.offset : entry.offset + entry.image_bytes]
        return np.array(flat).reshape(entry.height, entry.width, 3)

    def mask(self, image_id: str) -> np.ndarray:
        """HxW uint8, as :func:`segflow.data.imageio.read_mask` returns it."""
        entry = self._entry(image_id)
        if not entry.labeled:
            raise SegflowError(f"{self.cache_dir}: image {image_id!r} has no mask in the decoded-image cache; "
                               f"{REBUILD}.")
        start = entry.offset + entry.image_bytes
        return np.array(self.shards()[entry.shard][start : start + entry.height * entry.width]).reshape(
            entry.height, entry.width)


def open_cache(cache_dir: Path, data_dir: Path) -> DecodedCache:
    """The cache in ``cache_dir``, checked against the ingested folder ``data_dir``: built from its manifest,
    one entry per image, every shard present with the size the index gives. Anything else is a SegflowError."""
    cache_dir = Path(cache_dir)
    index_path = cache_dir / INDEX_FILE
    try:
        index = json.loads(index_path.read_text())
        entries = [Entry(str(i), int(s), int(o), int(h), int(w), bool(m)) for i, s, o, h, w, m in index["entries"]]
        shard_files = [(str(shard["file"]), int(shard["bytes"])) for shard in index["shards"]]
        count, version, built_from = int(index["images"]), index["format"], dict(index["built_from_sha256"])
    except FileNotFoundError:
        raise SegflowError(f"{index_path}: no decoded-image cache here (train.decoded_cache is on); build it with "
                           "`segflow cache` (or `dvc repro cache`).") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise SegflowError(f"{index_path}: unreadable index of the decoded-image cache ({exc!r}); {REBUILD}.") from None
    if version != FORMAT:
        raise SegflowError(f"{index_path}: cache format {version!r}, this segflow reads {FORMAT}; {REBUILD}.")
    if changed := differences(built_from, ingested_sha256(data_dir)):
        raise SegflowError(f"{cache_dir}: the decoded-image cache is stale: {data_dir} has {changed} since it was "
                           f"built; {REBUILD}.")
    if len(entries) != count or len({e.image_id for e in entries}) != count:
        raise SegflowError(f"{index_path}: lists {len(entries)} entries for {count} images; {REBUILD}.")
    outside = [e.image_id for e in entries if not (0 <= e.shard < len(shard_files)
                                                   and e.offset + e.nbytes <= shard_files[e.shard][1])]
    if outside:
        raise SegflowError(f"{index_path}: {len(outside)} entries (first {outside[0]!r}) lie outside the shards; "
                           f"{REBUILD}.")
    cache = DecodedCache(cache_dir, entries, shard_files)
    cache.shards()  # every shard there, of the right size, now rather than in a loader worker
    return cache
