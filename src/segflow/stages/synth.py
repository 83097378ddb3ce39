"""Embedded synthetic dataset: street-like scenes with five object classes, in COCO instance format.

The data is meant to be an honest (small) learning problem rather than a toy:

* each class has its own shape family (cars: rounded boxes with wheels and a window band; trees: irregular
  star-shaped blobs; signs: bordered triangles; poles: thin tilted bars; balls: shaded discs) and its own
  texture (gradient, speckle, border ring, stripes, radial highlight);
* colours are drawn from per-class mixtures that share components with each other and with the background,
  so colour alone does not decide the class;
* objects vary in scale, overlap each other, are cut off by the image border, and sit on a multi-octave
  noise background with unlabeled clutter (bars, ellipses, blobs) in background-like colours;
* every image gets an illumination gradient, blur and Gaussian noise.

Labels are made by painting instances in order into an instance map (later objects on top), so an occluded
object's annotation is exactly its *visible* region. A placement that would punch a hole into an earlier
object's visible region, or hide most of it, is rejected and re-drawn, because a COCO polygon cannot
express holes. Polygons trace pixel edges (inset by a quarter pixel), so rasterising them with pycocotools
reproduces the visible regions pixel for pixel, whatever order the instances are painted in.

Every image draws from its own generator seeded by ``(seed, stream, index)``: the same seed gives
byte-identical files, and e.g. labeled image 7 does not change when ``num_unlabeled`` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from segflow.config import SynthParams
from segflow.data.imageio import write_image
from segflow.errors import SegflowError
from segflow.fsutil import owned_dir


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    supercategory: str


# Non-contiguous ids on purpose: consumers must map category id -> class index, not assume id == index.
CATEGORIES: tuple[Category, ...] = (
    Category(1, "car", "vehicle"),
    Category(2, "tree", "vegetation"),
    Category(3, "sign", "street_furniture"),
    Category(5, "pole", "street_furniture"),
    Category(8, "ball", "object"),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in sorted(CATEGORIES, key=lambda c: c.id))
_CATEGORY_ID = {c.name: c.id for c in CATEGORIES}

# Share of drawn objects per class: imbalanced, yet the rarest class still shows up in ~40% of images.
_CLASS_FREQUENCY = {"car": 0.30, "tree": 0.26, "pole": 0.18, "sign": 0.14, "ball": 0.12}

_COLOURS = {
    "red": (190, 45, 40),
    "blue": (45, 75, 175),
    "white": (215, 215, 208),
    "grey": (120, 120, 124),
    "black": (40, 40, 45),
    "yellow": (215, 185, 45),
    "orange": (215, 120, 35),
    "green": (70, 135, 55),
    "dark_green": (35, 85, 40),
    "brown": (115, 80, 50),
}
# Per-class colour mixtures deliberately share components (red cars, signs and balls; grey cars and poles;
# green trees and balls; brown trees and poles) so that only shape and texture separate the classes.
_CLASS_COLOURS = {
    "car": {"red": 0.25, "blue": 0.2, "white": 0.15, "grey": 0.25, "black": 0.15},
    "tree": {"green": 0.45, "dark_green": 0.35, "brown": 0.1, "yellow": 0.1},
    "sign": {"red": 0.4, "yellow": 0.25, "blue": 0.2, "white": 0.15},
    "pole": {"grey": 0.45, "brown": 0.25, "white": 0.15, "black": 0.15},
    "ball": {"orange": 0.25, "red": 0.2, "white": 0.2, "yellow": 0.15, "green": 0.1, "blue": 0.1},
}
# Background tones overlap the tree, pole and car colours on purpose.
_BACKGROUND_COLOURS = np.array(
    [(95, 112, 78), (122, 102, 76), (116, 116, 110), (72, 78, 66), (158, 146, 116), (60, 100, 52)],
    dtype=np.float32,
)

_MAX_OBJECTS = 8
_PLACEMENT_ATTEMPTS = 4
_MIN_VISIBLE_FRACTION = 0.3  # an object hidden beyond this is not worth a label
_MIN_OBJECT_PIXELS = 10
LABELED_STREAM, UNLABELED_STREAM = 0, 1


@dataclass(frozen=True)
class Scene:
    """One rendered image with its ground truth.

    ``instance_map`` holds 0 for background and k for the k-th object in painting order (1-based);
    ``instance_category_ids[k - 1]`` is that object's COCO category id.
    """

    image: np.ndarray
    instance_map: np.ndarray
    instance_category_ids: tuple[int, ...]

    def label_map(self) -> np.ndarray:
        """HxW uint8 map of COCO category ids, 0 for background."""
        lookup = np.array((0, *self.instance_category_ids), dtype=np.uint8)
        return lookup[self.instance_map]


@dataclass(frozen=True)
class _Sprite:
    """A shape drawn on its own little canvas whose top-left pixel sits at (y0, x0) of the image."""

    y0: int
    x0: int
    mask: np.ndarray  # bool, h x w
    rgb: np.ndarray  # float32, h x w x 3

    def full_mask(self, size: int) -> np.ndarray:
        """The sprite's mask on a size x size image, clipped at the border."""
        out = np.zeros((size, size), dtype=bool)
        image_slices, sprite_slices = self._overlap(size)
        out[image_slices] = self.mask[sprite_slices]
        return out

    def paint(self, canvas: np.ndarray, alpha: float = 1.0) -> None:
        image_slices, sprite_slices = self._overlap(canvas.shape[0])
        mask = self.mask[sprite_slices]
        region = canvas[image_slices]
        region[mask] = (1.0 - alpha) * region[mask] + alpha * self.rgb[sprite_slices][mask]

    def _overlap(self, size: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        h, w = self.mask.shape
        top, left = max(self.y0, 0), max(self.x0, 0)
        bottom, right = min(self.y0 + h, size), min(self.x0 + w, size)
        bottom, right = max(bottom, top), max(right, left)  # empty slices when fully outside
        image_slices = (slice(top, bottom), slice(left, right))
        sprite_slices = (slice(top - self.y0, bottom - self.y0), slice(left - self.x0, right - self.x0))
        return image_slices, sprite_slices


def _local_grid(cy: float, cx: float, radius: float) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Top-left pixel and pixel-centre offsets (dy, dx) from (cy, cx) over a box reaching ``radius`` out."""
    y0, x0 = int(np.floor(cy - radius)), int(np.floor(cx - radius))
    y1, x1 = int(np.ceil(cy + radius)), int(np.ceil(cx + radius))
    ys = np.arange(y0, y1 + 1, dtype=np.float32) + 0.5 - cy
    xs = np.arange(x0, x1 + 1, dtype=np.float32) + 0.5 - cx
    dy, dx = np.meshgrid(ys, xs, indexing="ij")
    return y0, x0, dy, dx


def _rotate(dy: np.ndarray, dx: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (along, across) in a frame rotated by ``angle`` radians."""
    c, s = np.cos(angle), np.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def _object_colour(rng: np.random.Generator, class_name: str) -> np.ndarray:
    mixture = _CLASS_COLOURS[class_name]
    name = rng.choice(list(mixture), p=list(mixture.values()))
    base = np.array(_COLOURS[name], dtype=np.float32)
    return (base * rng.uniform(0.8, 1.15) + rng.normal(0.0, 16.0, 3)).astype(np.float32)


def _shade(colour: np.ndarray, brightness: np.ndarray) -> np.ndarray:
    return brightness[..., None].astype(np.float32) * colour


def _draw_car(rng: np.random.Generator, cy: float, cx: float, size: int) -> _Sprite:
    half_length = size * np.exp(rng.uniform(np.log(0.08), np.log(0.22)))
    half_height = half_length / rng.uniform(1.7, 2.6)
    corner = 0.35 * half_height
    wheel_radius = 0.42 * half_height
    y0, x0, dy, dx = _local_grid(cy, cx, half_length + wheel_radius + 1)
    along, across = _rotate(dy, dx, rng.uniform(-0.25, 0.25))
    # Rounded rectangle: distance to the inner rectangle shrunk by the corner radius.
    out_u = np.maximum(np.abs(along) - (half_length - corner), 0.0)
    out_v = np.maximum(np.abs(across) - (half_height - corner), 0.0)
    body = out_u**2 + out_v**2 <= corner**2
    wheel_u = np.abs(along) - 0.6 * half_length
    wheels = wheel_u**2 + (across - half_height) ** 2 <= wheel_radius**2
    colour = _object_colour(rng, "car")
    # Texture: top-lit gradient over the body, a dark window band, dark tyres.
    brightness = 1.15 - 0.3 * np.clip((across + half_height) / (2 * half_height), 0.0, 1.0)
    window_rows = (across > -0.75 * half_height) & (across < -0.1 * half_height)
    window = window_rows & (np.abs(along) < 0.55 * half_length)
    brightness = np.where(window, 0.45 * brightness, brightness)
    rgb = _shade(colour, brightness)
    rgb[wheels & ~body] = np.array((35, 35, 38), dtype=np.float32) * rng.uniform(0.8, 1.2)
    return _Sprite(y0, x0, body | wheels, rgb)


def _draw_tree(rng: np.random.Generator, cy: float, cx: float, size: int) -> _Sprite:
    radius = size * np.exp(rng.uniform(np.log(0.07), np.log(0.19)))
    harmonics = np.arange(2, 7)
    # Star-shaped outline r(theta) > 0: irregular, but always one piece without holes.
    amplitudes = rng.uniform(0.0, 0.35, harmonics.size) / harmonics * 2
    amplitudes *= min(1.0, 0.5 / amplitudes.sum())
    phases = rng.uniform(0.0, 2 * np.pi, harmonics.size)
    y0, x0, dy, dx = _local_grid(cy, cx, radius * 1.5 + 1)
    theta = np.arctan2(dy, dx)[..., None]
    outline = radius * (1.0 + (amplitudes * np.cos(harmonics * theta + phases)).sum(axis=-1))
    distance = np.hypot(dy, dx)
    mask = distance <= outline
    colour = _object_colour(rng, "tree")
    # Texture: leafy speckle, slightly darker towards the rim.
    speckle = 1.0 + 0.2 * rng.standard_normal(mask.shape, dtype=np.float32)
    brightness = speckle * (1.1 - 0.3 * np.clip(distance / outline, 0.0, 1.0))
    return _Sprite(y0, x0, mask, _shade(colour, brightness))


def _draw_sign(rng: np.random.Generator, cy: float, cx: float, size: int) -> _Sprite:
    inradius = size * np.exp(rng.uniform(np.log(0.03), np.log(0.08)))
    y0, x0, dy, dx = _local_grid(cy, cx, 2 * inradius + 1)
    along, across = _rotate(dy, dx, rng.uniform(-0.2, 0.2))
    # Upward triangle as the intersection of three half-planes (outward normals down, up-left, up-right).
    normal_angles = np.pi / 2 + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
    support = np.max([along * np.cos(a) + across * np.sin(a) for a in normal_angles], axis=0)
    mask = support <= inradius
    face = support <= inradius * rng.uniform(0.45, 0.7)
    border_colour = _object_colour(rng, "sign")
    if rng.random() < 0.65:
        face_colour = np.array(_COLOURS["white"], dtype=np.float32) * rng.uniform(0.85, 1.1)
    else:
        face_colour = np.clip(border_colour * 1.4, 0, 255)
        border_colour = border_colour * 0.6
    rgb = np.where(face[..., None], face_colour, border_colour).astype(np.float32)
    return _Sprite(y0, x0, mask, rgb)


def _draw_pole(rng: np.random.Generator, cy: float, cx: float, size: int) -> _Sprite:
    half_length = size * rng.uniform(0.15, 0.4)
    half_width = max(0.75, size * rng.uniform(0.007, 0.02))
    y0, x0, dy, dx = _local_grid(cy, cx, half_length + 1)
    along, across = _rotate(dy, dx, np.pi / 2 + rng.uniform(-0.15, 0.15))
    mask = (np.abs(across) <= half_width) & (np.abs(along) <= half_length)
    colour = _object_colour(rng, "pole")
    # Texture: bands across the pole, like a painted bollard.
    period = rng.uniform(3.0, 9.0)
    stripe = np.sin(2 * np.pi * along / period + rng.uniform(0.0, 2 * np.pi)) > 0
    brightness = np.where(stripe, 1.0 - rng.uniform(0.2, 0.5), 1.1)
    return _Sprite(y0, x0, mask, _shade(colour, brightness))


def _draw_ball(rng: np.random.Generator, cy: float, cx: float, size: int) -> _Sprite:
    radius = size * np.exp(rng.uniform(np.log(0.035), np.log(0.11)))
    y0, x0, dy, dx = _local_grid(cy, cx, radius + 1)
    mask = np.hypot(dy, dx) <= radius
    colour = _object_colour(rng, "ball")
    # Texture: a spherical highlight up-left, falling off towards the rim.
    highlight = np.hypot(dy + 0.35 * radius, dx + 0.35 * radius) / (1.5 * radius)
    brightness = 1.3 - 0.65 * np.clip(highlight, 0.0, 1.0)
    return _Sprite(y0, x0, mask, _shade(colour, brightness))


_DRAWERS = {
    "car": _draw_car,
    "tree": _draw_tree,
    "sign": _draw_sign,
    "pole": _draw_pole,
    "ball": _draw_ball,
}


def _draw_clutter(rng: np.random.Generator, cy: float, cx: float, size: int, colour: np.ndarray) -> _Sprite:
    """An unlabeled ellipse, bar or blob: object-like shapes in background colours, flat texture."""
    kind = rng.integers(3)
    if kind == 0:
        half_axes = size * rng.uniform(0.02, 0.12, 2)
        y0, x0, dy, dx = _local_grid(cy, cx, half_axes.max() + 1)
        along, across = _rotate(dy, dx, rng.uniform(0.0, np.pi))
        mask = (along / half_axes[0]) ** 2 + (across / half_axes[1]) ** 2 <= 1.0
    elif kind == 1:
        half_length, half_width = size * rng.uniform(0.08, 0.35), size * rng.uniform(0.006, 0.02)
        y0, x0, dy, dx = _local_grid(cy, cx, half_length + 1)
        along, across = _rotate(dy, dx, rng.uniform(0.0, np.pi))
        mask = (np.abs(across) <= half_width) & (np.abs(along) <= half_length)
    else:
        radius = size * rng.uniform(0.03, 0.1)
        y0, x0, dy, dx = _local_grid(cy, cx, 1.5 * radius + 1)
        theta = np.arctan2(dy, dx)
        outline = radius * (1.0 + 0.3 * np.cos(3 * theta + rng.uniform(0, 2 * np.pi)))
        mask = np.hypot(dy, dx) <= outline
    rgb = np.broadcast_to(colour, (*mask.shape, 3)).astype(np.float32)
    return _Sprite(y0, x0, mask, rgb)


def _value_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Multi-octave value noise in [0, 1]: random grids, bicubically upsampled and summed."""
    total = np.zeros((size, size), dtype=np.float32)
    weight = 1.0
    for cells in (max(2, size // 32), max(3, size // 16), max(4, size // 8), max(5, size // 4)):
        grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
        total += weight * cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
        weight *= 0.55
    low, high = total.min(), total.max()
    return (total - low) / max(high - low, 1e-6)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    pair = _BACKGROUND_COLOURS[rng.choice(len(_BACKGROUND_COLOURS), 2, replace=False)]
    pair = pair + rng.normal(0.0, 10.0, pair.shape).astype(np.float32)
    blend = _value_noise(rng, size)[..., None]
    shading = 0.85 + 0.3 * _value_noise(rng, size)[..., None]
    return (pair[0] + blend * (pair[1] - pair[0])) * shading


def _random_centre(rng: np.random.Generator, size: int) -> tuple[float, float]:
    cy, cx = rng.uniform(0.05 * size, 0.95 * size, 2)
    return float(cy), float(cx)


def _doubled_contours(mask: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, int, int]:
    """Outer contours of ``mask`` cropped with a one-pixel margin and upsampled 2x; also the crop and origin.

    On the 2x grid a contour through boundary sub-pixel centres runs a quarter pixel inside the original
    pixel edges, so a polygon rasteriser that tests pixel centres reproduces the mask exactly.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = np.zeros((rows[-1] - rows[0] + 3, cols[-1] - cols[0] + 3), dtype=np.uint8)
    crop[1:-1, 1:-1] = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    doubled = crop.repeat(2, axis=0).repeat(2, axis=1)
    contours, _ = cv2.findContours(doubled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return list(contours), crop, int(rows[0] - 1), int(cols[0] - 1)


def _polygons_cover_exactly(mask: np.ndarray) -> bool:
    """True when filling the outer contours gives back ``mask``, i.e. the region has no holes."""
    contours, crop, _, _ = _doubled_contours(mask)
    filled = np.zeros((crop.shape[0] * 2, crop.shape[1] * 2), dtype=np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return bool(np.array_equal(filled[::2, ::2], crop))


def visible_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons [[x1, y1, x2, y2, ...], ...] (pixel-corner coordinates) outlining a non-empty mask."""
    contours, _, top, left = _doubled_contours(mask)
    polygons = []
    for contour in contours:
        points = contour.reshape(-1, 2).astype(np.float64)
        points = (points + 0.5) / 2 + (left, top)
        polygons.append(points.ravel().tolist())
    return polygons


def render_scene(seed: int, stream: int, index: int, image_size: int) -> Scene:
    """Render image ``index`` of ``stream`` (LABELED_STREAM or UNLABELED_STREAM); pure and deterministic."""
    rng = np.random.default_rng([seed, stream, index])
    canvas = _background(rng, image_size)

    for _ in range(rng.integers(3, 11)):
        cy, cx = _random_centre(rng, image_size)
        local_tone = canvas[int(cy), int(cx)]
        colour = local_tone * rng.uniform(0.65, 1.35) + rng.normal(0.0, 10.0, 3).astype(np.float32)
        _draw_clutter(rng, cy, cx, image_size, colour).paint(canvas, alpha=rng.uniform(0.35, 1.0))

    instance_map = np.zeros((image_size, image_size), dtype=np.int32)
    unoccluded_areas: list[int] = []  # pixels inside the image before later objects covered any
    category_ids: list[int] = []
    class_names, frequencies = list(_CLASS_FREQUENCY), list(_CLASS_FREQUENCY.values())
    for _ in range(min(_MAX_OBJECTS, 2 + rng.poisson(3.0))):
        class_name = class_names[rng.choice(len(class_names), p=frequencies)]
        instance_id = len(category_ids) + 1
        for _ in range(_PLACEMENT_ATTEMPTS):
            sprite = _DRAWERS[class_name](rng, *_random_centre(rng, image_size), image_size)
            new_mask = sprite.full_mask(image_size)
            areas = [*unoccluded_areas, int(new_mask.sum())]
            if areas[-1] < _MIN_OBJECT_PIXELS:
                continue
            candidate = np.where(new_mask, instance_id, instance_map)
            touched = [int(k) for k in np.unique(instance_map[new_mask]) if k] + [instance_id]
            if all(_acceptable_visible_region(candidate == k, areas[k - 1]) for k in touched):
                sprite.paint(canvas)
                instance_map = candidate
                unoccluded_areas = areas
                category_ids.append(_CATEGORY_ID[class_name])
                break

    image = _finish(rng, canvas)
    return Scene(image, instance_map, tuple(category_ids))


def _acceptable_visible_region(visible: np.ndarray, unoccluded_area: int) -> bool:
    """Enough of the object still shows, and in a shape that polygons can describe."""
    area = int(visible.sum())
    return area >= _MIN_VISIBLE_FRACTION * unoccluded_area and _polygons_cover_exactly(visible)


def _finish(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """Camera effects: illumination gradient, blur, sensor noise; then quantise to uint8."""
    size = canvas.shape[0]
    angle = rng.uniform(0.0, 2 * np.pi)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    along = np.float32(np.cos(angle)) * ramp[None, :] + np.float32(np.sin(angle)) * ramp[:, None]
    gain = np.float32(rng.uniform(0.8, 1.15)) * (1.0 + np.float32(rng.uniform(0.0, 0.5)) * along)
    lit = canvas * gain[..., None]
    blurred = cv2.GaussianBlur(lit, (0, 0), sigmaX=rng.uniform(0.3, 1.0))
    noise = rng.standard_normal(blurred.shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 8.0))
    noisy = blurred + noise
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _annotations(scene: Scene, image_id: int, first_annotation_id: int) -> list[dict]:
    annotations = []
    for k, category_id in enumerate(scene.instance_category_ids, start=1):
        visible = scene.instance_map == k
        rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        annotations.append(
            {
                "id": first_annotation_id + len(annotations),
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": visible_polygons(visible),
                "area": int(visible.sum()),
                "bbox": [int(x) for x in (cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)],
                "iscrowd": 0,
            }
        )
    return annotations


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SegflowError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise SegflowError(f"{name} must be at least {minimum}, got {value}.")


_DEFAULT = SynthParams()  # params.yaml's synth section: one set of defaults for the schema, this and the CLI


def generate(
    out: Path | str,
    *,
    seed: int = _DEFAULT.seed,
    num_labeled: int = _DEFAULT.num_labeled,
    num_unlabeled: int = _DEFAULT.num_unlabeled,
    image_size: int = _DEFAULT.image_size,
) -> dict:
    """Write the dataset to ``out`` atomically and return a summary.

    Layout: ``images/*.png`` with ``annotations.json`` (COCO instances, polygon segmentations of the visible
    regions), and ``unlabeled/*.png`` from the same distribution without annotations.
    """
    _check_int("seed", seed, 0)
    _check_int("num_labeled", num_labeled, 1)
    _check_int("num_unlabeled", num_unlabeled, 0)
    _check_int("image_size", image_size, 32)
    # Plain ints from here on, so numpy integers passed in still serialise to JSON.
    seed, num_labeled, num_unlabeled, image_size = map(int, (seed, num_labeled, num_unlabeled, image_size))

    images, annotations = [], []
    instances_per_class = dict.fromkeys(CLASS_NAMES, 0)
    name_of = {c.id: c.name for c in CATEGORIES}
    with owned_dir(out, "segflow synth") as tmp:
        (tmp / "images").mkdir()
        (tmp / "unlabeled").mkdir()
        for index in range(num_labeled):
            scene = render_scene(seed, LABELED_STREAM, index, image_size)
            file_name = f"labeled_{index:06d}.png"
            write_image(tmp / "images" / file_name, scene.image)
            image_id = index + 1
            images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
            annotations.extend(_annotations(scene, image_id, len(annotations) + 1))
            for category_id in scene.instance_category_ids:
                instances_per_class[name_of[category_id]] += 1
        for index in range(num_unlabeled):
            scene = render_scene(seed, UNLABELED_STREAM, index, image_size)
            # Distinct stems: ingest derives image ids from file names across both folders.
            write_image(tmp / "unlabeled" / f"unlabeled_{index:06d}.png", scene.image)
        coco = {
            "info": {"description": "segflow synthetic street scenes", "seed": seed},
            "images": images,
            "annotations": annotations,
            "categories": [
                {"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in CATEGORIES
            ],
        }
        # Compact on purpose: polygons are long, and nobody reads this file by eye.
        text = json.dumps(coco, separators=(",", ":")) + "\n"
        (tmp / "annotations.json").write_text(text, encoding="utf-8")

    return {
        "num_labeled": num_labeled,
        "num_unlabeled": num_unlabeled,
        "num_annotations": len(annotations),
        "image_size": image_size,
        "class_names": list(CLASS_NAMES),
        "category_ids": [c.id for c in sorted(CATEGORIES, key=lambda c: c.id)],
        "instances_per_class": instances_per_class,
    }


def synth_stage(out: Path | str, data_root: Path | str, **sizes: int) -> dict | None:
    """The synth stage: :func:`generate` into ``out`` when params.yaml's ``data.root`` is that folder; else
    ``out`` becomes an empty folder (DVC wants the stage's output, and nothing reads it) and None is returned."""
    if Path(data_root).resolve() == Path(out).resolve():
        return generate(out, **sizes)
    with owned_dir(out, "segflow synth"):
        pass
    return None
