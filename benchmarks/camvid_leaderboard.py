"""CamVid leaderboard: the classic architectures trained from scratch through segflow's own stages, under one budget.

    python benchmarks/camvid_leaderboard.py --camvid ../shared/datasets/camvid --height 90 --width 120 --epochs 10

CamVid (SegNet split: 367 train / 101 val / 233 test, 11 classes, void ignored) is resized to the stated
resolution (images bilinear, masks nearest) in a work folder; then each architecture goes through
``segflow ingest``, ``validate``, ``split``, ``train`` and ``evaluate`` exactly as ``dvc repro`` runs them,
with one shared budget (resolution, epochs, batch, optimizer, median frequency balancing as in SegNet).
Writes ``reports/camvid_leaderboard.{json,md}`` with the published anchors beside the results.
Architectures already evaluated under the same settings (a work subfolder per resolution, epochs, batch, lr and
width) are not retrained (delete it to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
           "Bicyclist"]
VOID = 11
SPLITS = {"train": "trainannot", "val": "valannot", "test": "testannot"}
# Architecture -> builder options. VGG-based models at half width so the CPU budget allows several epochs;
# full width is the default on a GPU (--full-width).
ARCHS = {
    "fcn8s": {"width": 0.5},
    "segnet": {"width": 0.5},
    "unet_original": {"width": 0.5},
    "deeplabv1_largefov": {"width": 0.5},
    "deeplabv3plus": {"encoder_name": "resnet18", "encoder_weights": None},
    "pspnet": {"backbone": "resnet18", "output_stride": 8, "encoder_weights": None},
    "segnet_basic": {},
}
# SegNet paper (Badrinarayanan et al. 2017), Table 1: CamVid, 367 training images, no pretraining, 360x480.
ANCHORS = [
    {"model": "SegNet-Basic (published)", "miou": 0.477},
    {"model": "FCN-Basic (published)", "miou": 0.473},
]


def resize_camvid(source: Path, target: Path, height: int, width: int) -> None:
    """Resized copy of the CamVid folders (written once per resolution)."""
    marker = target / f".resized-{height}x{width}"
    if marker.exists():
        return
    shutil.rmtree(target, ignore_errors=True)
    for images, masks in SPLITS.items():
        for folder, resample in [(images, Image.BILINEAR), (masks, Image.NEAREST)]:
            (target / folder).mkdir(parents=True)
            for path in sorted((source / folder).glob("*.png")):
                Image.open(path).resize((width, height), resample).save(target / folder / path.name)
    marker.touch()


def write_params(work: Path, args: argparse.Namespace, archs: dict[str, dict]) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] = {
        "format": "masks", "root": "camvid", "unlabeled": None, "strict": True,
        "masks": {"folders": [{"images": i, "masks": m, "split": i} for i, m in SPLITS.items()],
                  "classes": CLASSES, "ignore_value": VOID},
    }
    params["train"].update({
        "archs": list(archs), "epochs": args.epochs, "batch_size": args.batch, "crop_size": min(args.height, args.width),
        "optimizer": "adamw", "lr": args.lr, "lr_schedule": "poly", "class_weighting": True,
        "use_pseudo_labels": False, "seed": 0,
    })
    params["models"] = archs
    params["evaluate"]["num_overlays"] = 4
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def segflow(work: Path, *args: str) -> None:
    command = [str(Path(sys.executable).parent / "segflow"), *args]
    print("+", " ".join(args), flush=True)
    subprocess.run(command, cwd=work, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--camvid", type=Path, default=REPO.parent / "shared/datasets/camvid")
    parser.add_argument("--work", type=Path, default=REPO / ".bench/camvid")
    parser.add_argument("--out", type=Path, default=REPO / "reports/camvid_leaderboard")
    parser.add_argument("--height", type=int, default=90)
    parser.add_argument("--width", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--full-width", action="store_true", help="the VGG models at the paper's width")
    args = parser.parse_args()

    # Models and scores are cached in the work folder: one folder per setting, so no two settings ever mix.
    setting = f"{args.height}x{args.width}-epochs-{args.epochs}-batch-{args.batch}-lr-{args.lr:g}"
    work = args.work.resolve() / (setting + ("-full-width" if args.full_width else ""))
    work.mkdir(parents=True, exist_ok=True)
    archs = {name: ({k: v for k, v in ARCHS[name].items() if k != "width"} if args.full_width else ARCHS[name])
             for name in args.archs}
    resize_camvid(args.camvid.resolve(), work / "camvid", args.height, args.width)
    write_params(work, args, archs)
    if not (work / "data/splits.csv").exists():
        segflow(work, "ingest", "from-params")
        segflow(work, "validate", "data/ingested", "--out", "data/validation")
        segflow(work, "split")
    for name in archs:
        if (work / "metrics" / f"{name}.json").exists():
            continue
        started = time.perf_counter()
        segflow(work, "train", "--arch", name)
        segflow(work, "evaluate", "--arch", name)
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)

    rows = []
    for name, options in archs.items():
        metrics = json.loads((work / "metrics" / f"{name}.json").read_text())
        rows.append({
            "model": name, "options": options, "miou": metrics["miou"], "pixel_accuracy": metrics["pixel_accuracy"],
            "mean_class_accuracy": metrics["mean_class_accuracy"], "parameters": metrics["parameters"],
            "gflops": metrics["gflops"], "train_seconds": metrics["train_seconds"],
            "per_class_iou": metrics["per_class_iou"],
        })
    rows.sort(key=lambda row: -row["miou"])
    budget = {
        "resolution": [args.height, args.width], "epochs": args.epochs, "batch": args.batch,
        "crop": min(args.height, args.width), "optimizer": f"AdamW lr {args.lr}, poly", "class_weighting": "median frequency",
        "pretraining": "none", "device": os.environ.get("SEGFLOW_BENCH_DEVICE", _device()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"budget": budget, "results": rows, "anchors": ANCHORS}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(budget, rows))
    print(_markdown(budget, rows))


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def _markdown(budget: dict, rows: list[dict]) -> str:
    lines = [
        "# CamVid leaderboard (from scratch)",
        "",
        "Budget: " + ", ".join(f"{k} {v}" for k, v in budget.items()) + ". "
        "Test split: 233 images, 11 classes, void ignored.",
        "",
        "| model | options | test mIoU | pixel acc. | mean class acc. | params (M) | GFLOPs | train (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['options'] or ''} | {100 * row['miou']:.1f} | {100 * row['pixel_accuracy']:.1f} "
            f"| {100 * row['mean_class_accuracy']:.1f} | {row['parameters'] / 1e6:.1f} | {row['gflops']:.1f} "
            f"| {row['train_seconds'] / 60:.1f} |"
        )
    for anchor in ANCHORS:
        lines.append(f"| {anchor['model']} | 360×480, trained to convergence | {100 * anchor['miou']:.1f} | | | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
