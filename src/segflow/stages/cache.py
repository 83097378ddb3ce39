"""The cache stage: every ingested image and mask decoded once into the shards :mod:`segflow.data.decoded_cache`
describes and reads."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segflow.data.decoded_cache import CACHE_DIR, FORMAT, INDEX_FILE, Entry, shard_name
from segflow.data.fingerprint import ingested_sha256
from segflow.data.imageio import read_image, read_mask
from segflow.data.manifest import read_manifest
from segflow.errors import SegflowError
from segflow.fsutil import atomic_dir, atomic_write_json, refuse_overlap

SHARD_BYTES = 1 << 30


@dataclass(frozen=True)
class CacheSummary:
    images: int
    masks: int
    shards: int
    nbytes: int


def _layout(manifest: Any, shard_bytes: int) -> tuple[list[Entry], list[int]]:
    """Entries in manifest order, packed greedily into shards of at most ``shard_bytes``; the shards' sizes."""
    entries: list[Entry] = []
    sizes = [0]
    for row in manifest.itertuples():
        height, width, labeled = int(row.height), int(row.width), bool(row.mask_path)
        if sizes[-1] and sizes[-1] + height * width * (4 if labeled else 3) > shard_bytes:
            sizes.append(0)
        entries.append(Entry(row.image_id, len(sizes) - 1, sizes[-1], height, width, labeled))
        sizes[-1] += entries[-1].nbytes
    return entries, sizes


def build_cache(data_dir: Path, out: Path = CACHE_DIR, shard_bytes: int = SHARD_BYTES) -> CacheSummary:
    """Decode every image (and mask) of the ingested folder ``data_dir`` into the cache folder ``out``,
    replaced whole on success. Shapes come from the manifest and are checked against each decoded file."""
    data_dir = Path(data_dir)
    refuse_overlap(out, [data_dir], "segflow cache")
    manifest = read_manifest(data_dir)
    entries, sizes = _layout(manifest, shard_bytes)
    built_from = ingested_sha256(data_dir)  # before decoding: a file changed meanwhile makes the cache stale, not wrong
    rows = {row.image_id: row for row in manifest.itertuples()}
    with atomic_dir(out) as staging:
        shards = [np.lib.format.open_memmap(staging / shard_name(i), mode="w+", dtype=np.uint8, shape=(size,))
                  for i, size in enumerate(sizes)]

        def decode(entry: Entry) -> None:
            row = rows[entry.image_id]
            image = read_image(data_dir / row.image_path)
            arrays = [(data_dir / row.image_path, image, (entry.height, entry.width, 3))]
            if entry.labeled:
                arrays.append((data_dir / row.mask_path, read_mask(data_dir / row.mask_path), (entry.height, entry.width)))
            offset = entry.offset
            for path, array, shape in arrays:
                if array.shape != shape:
                    raise SegflowError(f"{path}: decodes to {array.shape[1]}x{array.shape[0]} but "
                                       f"{data_dir / 'manifest.csv'} says {entry.width}x{entry.height}; "
                                       "re-run the ingest stage.")
                shards[entry.shard][offset : offset + array.size] = array.reshape(-1)
                offset += array.size

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # decoders release the GIL
            for _ in pool.map(decode, entries):
                pass
        for shard in shards:
            shard.flush()
        shards.clear()  # the memory maps are closed before the folder is renamed into place
        atomic_write_json(staging / INDEX_FILE, {
            "format": FORMAT,
            "built_from_sha256": built_from,
            "images": len(entries),
            "shards": [{"file": shard_name(i), "bytes": size} for i, size in enumerate(sizes)],
            "entries": [[e.image_id, e.shard, e.offset, e.height, e.width, e.labeled] for e in entries],
        })
    return CacheSummary(len(entries), sum(e.labeled for e in entries), len(sizes), sum(sizes))


