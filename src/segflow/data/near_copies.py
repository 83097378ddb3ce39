"""Near-copies: the same picture more than once in a data set, which must never sit on both sides of a split.

Three links make two images one picture, joined transitively: identical pixels (the content hash), a name a
labeling tool gives its augmented exports (Roboflow's ``NAME_jpg.rf.HASH.jpg``) or ``split.group_by``'s key, and
pixels that register onto each other (:func:`near_copy_groups`).

Registration, because a perceptual hash alone does not tell a crop from another scene: a 10% crop with a 5 degree
rotation moves a pHash (``imagehash``'s, 64 bits) by up to 26 bits on the default data while two different scenes
come within 18. So a hash only proposes: the pHash of each image's central region under 171 views (mirror, zoom
up to 10%, shifts, rotations up to 8 degrees) against the other's plain view, within ``CANDIDATE_BITS``; a proposal
is kept when ECC (Evangelidis & Psarakis 2008, OpenCV's ``findTransformECC``) aligns the two grayscale thumbnails
by an affine map from that view and their correlation reaches ``split.near_copy_similarity``. Measured
(benchmarks/near_copies.py): flipped, cropped, rotated, brightened, blurred, noisy JPEG copies of the default
data correlate 0.99 or more (5th percentile; every scene's copies end in one group), different scenes 0.87 at
most; CamVid's frames, 1 s apart, are linked at 0.97 only within a drive (a car waiting at a light films
near-copies).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from segflow.data.manifest import group_keys

# Roboflow names each export NAME_EXT.rf.HASH.EXT, where NAME_EXT is the uploaded file's name with its dot
# replaced: every augmented copy of one upload shares it.
EXPORT_NAME = re.compile(r"^(.+_(?:jpe?g|png|bmp|webp|tiff?))\.rf\.[0-9a-f]+\.[a-z]+$", re.IGNORECASE)

THUMBNAIL = 64  # side of the grayscale thumbnail the comparisons use
VIEW = 32  # side of a view, the pHash's input (imagehash's: 32 x 32, the 8 x 8 lowest DCT frequencies)
REGION = 0.8  # share of the frame a view covers: a crop or a rotation changes the borders
ZOOMS = (1.0, 0.95, 0.9)  # a crop keeping 90% of each side, resized back, is a 1/0.9 zoom
SHIFTS = (0, -1, 1)  # the zoomed view's centre: left, middle, right of the room the zoom leaves (and up, down)
ROTATIONS = (0, -4, 4, -8, 8)  # degrees (the order makes the plain view the first)
CANDIDATE_BITS = 12  # a proposal's pHash distance at most: copies measured 10 at most, scenes 10 at least
ECC_CRITERIA = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4)


def export_name_key(file_name: str) -> str | None:
    """The upload a labeling tool's exported copy comes from (Roboflow's ``NAME_jpg.rf.HASH.jpg``), else None."""
    match = EXPORT_NAME.match(Path(file_name).name)
    return None if match is None else match.group(1)


def thumbnail(image: np.ndarray) -> np.ndarray:
    """The H x W x 3 uint8 image as the comparisons see it: THUMBNAIL x THUMBNAIL grayscale, float32."""
    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA).astype(np.float32)


def _views() -> list[tuple[np.ndarray, bool]]:
    """Each view as (2 x 3 affine map from a view's pixel to the thumbnail's, mirrored); the plain view first."""
    views = []
    for zoom, rotation, shift_x, shift_y, mirrored in itertools.product(ZOOMS, ROTATIONS, SHIFTS, SHIFTS, (False, True)):
        if zoom == 1 and (shift_x or shift_y):
            continue  # no room to shift
        angle, scale, room = np.deg2rad(rotation), REGION * zoom * THUMBNAIL / VIEW, (1 - zoom) / 2 * THUMBNAIL
        linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        centre = np.array([THUMBNAIL / 2 + shift_x * room, THUMBNAIL / 2 + shift_y * room])
        views.append((np.hstack([linear, (centre - linear @ np.full(2, VIEW / 2))[:, None]]), mirrored))
    return views


VIEWS = _views()
# The central REGION of the thumbnail, where the registration is scored.
_MARGIN = round(THUMBNAIL * (1 - REGION) / 2)
CENTRE_MASK = np.zeros((THUMBNAIL, THUMBNAIL), np.uint8)
CENTRE_MASK[_MARGIN:THUMBNAIL - _MARGIN, _MARGIN:THUMBNAIL - _MARGIN] = 1


def _view_hashes(thumb: np.ndarray, views: list[tuple[np.ndarray, bool]]) -> np.ndarray:
    """pHash (64 bits, as uint64) of each view of the thumbnail."""
    mirror = np.ascontiguousarray(thumb[:, ::-1])
    pixels = np.stack([
        cv2.warpAffine(mirror if mirrored else thumb, matrix.astype(np.float32), (VIEW, VIEW),
                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT_101)
        for matrix, mirrored in views])
    low = np.stack([cv2.dct(view)[:8, :8].ravel() for view in pixels])
    return np.packbits(low > np.median(low, axis=1, keepdims=True), axis=1).view(">u8").ravel()


def similarity(moving: np.ndarray, fixed: np.ndarray, view: int = 0) -> float:
    """The correlation of ``fixed``'s central region with ``moving`` aligned onto it by ECC (an affine map, started
    from VIEWS[view]); 0 when the alignment does not converge."""
    matrix, mirrored = VIEWS[view]
    plain = VIEWS[0][0]
    # A view maps its pixel u to moving's x = A u + b and to fixed's y = A0 u + b0: moving's x = A A0^-1 (y - b0) + b.
    linear = matrix[:, :2] @ np.linalg.inv(plain[:, :2])
    warp = np.hstack([linear, (matrix[:, 2] - linear @ plain[:, 2])[:, None]]).astype(np.float32)
    source = np.ascontiguousarray(moving[:, ::-1]) if mirrored else moving
    try:
        correlation, _ = cv2.findTransformECC(cv2.GaussianBlur(fixed, (0, 0), 1), cv2.GaussianBlur(source, (0, 0), 1),
                                              warp, cv2.MOTION_AFFINE, ECC_CRITERIA, CENTRE_MASK, 1)
    except cv2.error:  # no convergence: nothing registers
        return 0.0
    return float(correlation)


def scored_pairs(thumbnails: list[np.ndarray | None]) -> list[tuple[int, int, float]]:
    """(i, j, similarity), i < j, for each pair a view's pHash proposes (within CANDIDATE_BITS): the correlation
    of the two thumbnails registered from the closest view. Images without a thumbnail (None) pair with none."""
    present = [i for i, thumb in enumerate(thumbnails) if thumb is not None]
    if len(present) < 2:
        return []
    view_hashes = [_view_hashes(thumbnails[i], VIEWS) for i in present]
    plain = np.array([hashes[0] for hashes in view_hashes], dtype=np.uint64)
    proposals: dict[tuple[int, int], tuple[int, int, int]] = {}  # (i, j) -> (bits, moving, view), the closest
    for row in range(len(present)):
        bits = np.bitwise_count(view_hashes[row][:, None] ^ plain[None, :])  # views x images
        best_view, closest = bits.argmin(axis=0), bits.min(axis=0)
        for column in np.flatnonzero(closest <= CANDIDATE_BITS):
            if column != row:
                pair = (min(row, int(column)), max(row, int(column)))
                proposal = (int(closest[column]), row, int(best_view[column]))
                proposals[pair] = min(proposals.get(pair, proposal), proposal)
    scored = []
    for (first, second), (_, moving, view) in sorted(proposals.items()):
        fixed = second if moving == first else first
        scored.append((present[first], present[second],
                       similarity(thumbnails[present[moving]], thumbnails[present[fixed]], view)))
    return scored


def near_pairs(thumbnails: list[np.ndarray | None], min_similarity: float) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, whose thumbnails register with a correlation of at least ``min_similarity``."""
    return [(i, j) for i, j, score in scored_pairs(thumbnails) if score >= min_similarity]


def picture_groups(links: list[list[str | None]], n: int, pairs: list[tuple[int, int]] = ()) -> list[int]:
    """A group number for each of ``n`` images, numbered in order of first appearance: images with an equal value
    in one of ``links`` (content hashes, ``split.group_by``'s keys, export names: None links nothing) or joined by
    one of ``pairs`` share one, transitively. An image with no link is a group of its own."""
    parent = list(range(n))

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
    for i, j in pairs:
        parent[root(j)] = root(i)
    numbers, _ = pd.factorize(pd.Series([root(i) for i in range(n)], dtype="int64"), sort=False)
    return numbers.tolist()


def near_copy_groups(thumbnails: list[np.ndarray | None], min_similarity: float | None) -> list[int]:
    """A group number per image: images whose pixels register onto each other (:func:`near_pairs`) share one,
    transitively; with ``min_similarity`` None (``split.near_copy_similarity: null``) each is its own."""
    pairs = [] if min_similarity is None else near_pairs(thumbnails, min_similarity)
    return picture_groups([], len(thumbnails), pairs)


def pictures(stats: pd.DataFrame, manifest: pd.DataFrame) -> list[int]:
    """The picture of each image (rows of the validate stage's statistics and the manifest, aligned): its
    near-copies share it (identical pixels, an export name, the validate stage's ``near_copy_group``)."""
    links = [[value or None for value in stats["content_hash"]],
             [export_name_key(path) for path in manifest["image_path"]],
             [None if pd.isna(value) or value == "" else str(value) for value in stats["near_copy_group"]]]
    return picture_groups(links, len(stats))


def split_groups(picture_of: list[int], manifest: pd.DataFrame, group_by: str | None, manifest_csv: Path) -> list[int]:
    """What the split keeps together: the images' pictures (:func:`pictures`) joined by ``split.group_by``'s keys."""
    keys = group_keys(manifest, group_by, manifest_csv)
    return picture_groups([[str(number) for number in picture_of], keys], len(keys))
