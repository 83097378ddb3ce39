"""COCO annotation documents for tests: entries, whole documents, and edits of a good one."""

from __future__ import annotations

import json
from pathlib import Path

SQUARE = [2, 2, 6, 2, 6, 5, 2, 5]  # pycocotools fills rows 2..4, columns 2..5 of this square


def image_entry(image_id: int, file_name: str, width: int = 10, height: int = 8) -> dict:
    return {"id": image_id, "file_name": file_name, "width": width, "height": height}


def annotation(annotation_id: int, image_id: int, category_id: int, segmentation, iscrowd: int = 0) -> dict:
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "iscrowd": iscrowd,
    }


def write_json(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


def coco_doc(images: list[dict], annotations: list[dict], categories: list[tuple[int, str]]) -> dict:
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": category_id, "name": name} for category_id, name in categories],
    }


def good_doc() -> dict:
    """Two 10x8 images, a.png and b.png, each with one square of its own category."""
    return coco_doc(
        [image_entry(1, "a.png"), image_entry(2, "b.png")],
        [annotation(1, 1, 1, [SQUARE]), annotation(2, 2, 2, [SQUARE])],
        [(1, "box"), (2, "ball")],
    )


def set_in(doc: dict, path: tuple, value) -> dict:
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def delete_in(doc: dict, path: tuple) -> dict:
    target = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return doc
