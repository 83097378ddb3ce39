"""Near-copies: the same picture more than once in a data set, which must never sit on both sides of a split.

Three links make two images one picture, joined transitively: identical pixels (the content hash), a name a
labeling tool gives its augmented exports (Roboflow's ``NAME_jpg.rf.HASH.jpg``) or ``split.group_by``'s key,
and a perceptual hash (pHash: the low frequencies of the image's DCT against their median, ``imagehash``) of the
image or of its mirror image within ``split.near_copy_distance`` bits. A flip, a small crop or rotation, a
brightness change, blur or noise move a pHash by a few bits; different pictures differ in about half of 64.
"""

from __future__ import annotations

import re
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from segflow.data.manifest import group_keys

# Roboflow names each export NAME_EXT.rf.HASH.EXT, where NAME_EXT is the uploaded file's name with its dot
# replaced: every augmented copy of one upload shares it.
EXPORT_NAME = re.compile(r"^(.+_(?:jpe?g|png|bmp|webp|tiff?))\.rf\.[0-9a-f]+\.[a-z]+$", re.IGNORECASE)
HASH_BITS = 64


def export_name_key(file_name: str) -> str | None:
    """The upload a labeling tool's exported copy comes from (Roboflow's ``NAME_jpg.rf.HASH.jpg``), else None."""
    match = EXPORT_NAME.match(Path(file_name).name)
    return None if match is None else match.group(1)


def picture_hash(image: np.ndarray) -> str:
    """pHash of an H x W x 3 uint8 image and of its mirror image, as 32 hex digits (2 x 64 bits)."""
    picture = Image.fromarray(image)
    return f"{imagehash.phash(picture)}{imagehash.phash(picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT))}"


def near_pairs(picture_hashes: list[str | None], max_distance: int) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, whose pictures lie within ``max_distance`` bits: image i's hash against image j's
    hash or its mirror's (a flipped copy). Images without a hash (None: not decoded) pair with none."""
    present = [i for i, h in enumerate(picture_hashes) if h]
    if len(present) < 2:
        return []
    words = np.array([[int(picture_hashes[i][:16], 16), int(picture_hashes[i][16:], 16)] for i in present],
                     dtype=np.uint64)
    pairs = []
    for row, i in enumerate(present[:-1]):
        others = words[row + 1:]
        distance = np.minimum(np.bitwise_count(others[:, 0] ^ words[row, 0]),
                              np.bitwise_count(others[:, 1] ^ words[row, 0]))
        pairs += [(i, present[row + 1 + k]) for k in np.flatnonzero(distance <= max_distance)]
    return pairs


def picture_groups(links: list[list[str | None]], picture_hashes: list[str | None],
                   max_distance: int | None) -> list[int]:
    """A group number per image, numbered in order of first appearance: images with an equal value in one of
    ``links`` (content hashes, ``split.group_by``'s keys, export names: None links nothing) or a near perceptual
    hash (unless ``max_distance`` is None) share one, transitively. An image with no link is a group of its own."""
    parent = list(range(len(picture_hashes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for values in links:
        first: dict[str, int] = {}
        for i, key in enumerate(values):
            if key is not None:
                parent[root(i)] = root(first.setdefault(key, i))
    if max_distance is not None:
        for i, j in near_pairs(picture_hashes, max_distance):
            parent[root(j)] = root(i)
    numbers, _ = pd.factorize(pd.Series([root(i) for i in range(len(parent))], dtype="int64"), sort=False)
    return numbers.tolist()


def pictures(stats: pd.DataFrame, manifest: pd.DataFrame, near_copy_distance: int | None) -> list[int]:
    """The picture of each image (rows of the validate stage's statistics and the manifest, aligned): its
    near-copies share it (identical pixels, an export name, a perceptual hash within ``split.near_copy_distance``
    bits)."""
    links = [[value or None for value in stats["content_hash"]],
             [export_name_key(path) for path in manifest["image_path"]]]
    return picture_groups(links, [value or None for value in stats["picture_hash"]], near_copy_distance)


def split_groups(picture_of: list[int], manifest: pd.DataFrame, group_by: str | None, manifest_csv: Path) -> list[int]:
    """What the split keeps together: the images' pictures (:func:`pictures`) joined by ``split.group_by``'s keys."""
    keys = group_keys(manifest, group_by, manifest_csv)
    return picture_groups([[str(number) for number in picture_of], keys], [None] * len(keys), None)
