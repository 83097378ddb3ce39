"""The semi-supervised tests' data and parameters: the embedded default data at a tiny size."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from segflow.config import parse_params
from segflow.stages.ingest import ingest_coco
from segflow.stages.synth import generate

SIZE = 48


def make_semi_supervised(root: Path) -> tuple[Path, Path]:
    """6 labeled training images, 10 whose masks are hidden, 6 without masks; 6 val, 6 test."""
    generate(root / "synthetic", seed=0, num_labeled=28, num_unlabeled=6, image_size=SIZE)
    ingest_coco(root / "synthetic/images", root / "synthetic/annotations.json", root / "ingested",
                unlabeled=root / "synthetic/unlabeled")
    manifest = pd.read_csv(root / "ingested/manifest.csv", dtype=str, keep_default_na=False)
    labeled = manifest.loc[manifest["mask_path"] != "", "image_id"].tolist()
    splits = ["train"] * 6 + ["unlabeled"] * 10 + ["val"] * 6 + ["test"] * 6
    rows = dict(zip(labeled, splits)) | {i: "unlabeled" for i in manifest.loc[manifest["mask_path"] == "", "image_id"]}
    (root / "splits.csv").write_text("image_id,split\n" + "".join(f"{i},{s}\n" for i, s in rows.items()))
    return root / "ingested", root / "splits.csv"


def semi_params(**sections) -> object:
    base = {
        "train": {"archs": ["unet"], "epochs": 1, "batch_size": 4, "crop_size": SIZE, "device": "cpu", "decoded_cache": False},
        "teacher": {"arch": "unet", "epochs": 3, "snapshots": 1},
        "pseudo_label": {"threshold": 0.95, "class_balanced": True, "class_keep_fraction": 0.5,
                         "reliable_fraction": 0.5},
        "evaluate": {"batch_size": 4, "num_overlays": 0, "inference": {"flip": True}},
        "models": {"unet": {"encoder_name": "resnet18"}},
    }
    for section, values in sections.items():
        base[section] = base.get(section, {}) | values
    return parse_params(base)
