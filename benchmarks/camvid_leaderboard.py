"""CamVid leaderboard: the classic architectures trained from scratch through segflow's own stages, under one budget.

    python benchmarks/camvid_leaderboard.py --camvid ../shared/datasets/camvid --seeds 0 1

CamVid (SegNet split: 367 train / 101 val / 233 test, 11 classes, void ignored) is resized to 90x120 (images
bilinear, masks nearest) once; ``segflow ingest``, ``validate``, ``split`` and ``cache`` prepare it once, then each
architecture goes through ``segflow train`` and ``evaluate`` exactly as ``dvc repro`` runs them, 10 epochs, batch 8,
class-weighted cross-entropy, for each seed and each of two recipes:

- ``architecture``: each architecture's own recipe (segflow.models.recipes, ``segflow models`` shows it), its
  default options (batch norm in the VGG-based networks) and the square roots of SegNet's median frequency weights
  (``train.class_weight_power: 0.5``; the full weights drove Building's IoU to 0.30 with rare classes painted over
  it: chosen on val, see the report);
- ``shared``: the control, segflow's single recipe before the recipes existed (AdamW lr 1e-3, weight decay 1e-4,
  poly, no parameter groups, aux weight 0.4), the papers' networks without batch norm, and SegNet's full median
  frequency weights, as the leaderboard before.

Both recipes see the same images, epochs and seeds. Writes ``reports/camvid_leaderboard.{json,md}``: per
architecture the test mIoU of each recipe (mean and range over the seeds), the difference, the leaderboard's
figure before the recipes (commit ea3f94a) and the majority-class baseline. Finished trainings are cached in the work folder (one folder per recipe and seed) and not
repeated; a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
           "Bicyclist"]
VOID = 11
SPLITS = {"train": "trainannot", "val": "valannot", "test": "testannot"}
HEIGHT, WIDTH, EPOCHS, BATCH = 90, 120, 10, 8
# Architecture -> builder options, the widths of the committed leaderboard: VGG-based models at half width so
# the CPU budget allows ten epochs.
ARCHS = {
    "fcn8s": {"width": 0.5},
    "segnet": {"width": 0.5},
    "unet_original": {"width": 0.5},
    "deeplabv1_largefov": {"width": 0.5},
    "deeplabv3plus": {"encoder_name": "resnet18", "encoder_weights": None},
    "pspnet": {"backbone": "resnet18", "output_stride": 8, "encoder_weights": None},
    "segnet_basic": {},
}
# The control: the one recipe every architecture trained with before, on the papers' networks.
SHARED_RECIPE = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "momentum": 0.9, "lr_schedule": "poly",
                 "warmup_steps": 0, "new_layers_lr_mult": 1.0, "bias_lr_mult": 1.0, "norm_bias_decay": True,
                 "aux_weight": 0.4}
# Class weights: the square roots of SegNet's median frequency weights with the recipes, the full ones for the control.
CLASS_WEIGHT_POWER = {"architecture": 0.5, "shared": 1.0}
PAPER_NETWORK = {"fcn8s": {"batch_norm": False}, "unet_original": {"batch_norm": False},
                 "deeplabv1_largefov": {"batch_norm": False}}
RECIPES = ("architecture", "shared")
# The recipes with SegNet's full class weights (commit 6224f48, the run before the square roots), seeds 0 and 1:
# test and val mIoU.
FULL_WEIGHTS = {
    "test": {"unet_original": [0.3517, 0.3619], "fcn8s": [0.3421, 0.3413], "deeplabv3plus": [0.3305, 0.3184],
             "pspnet": [0.3109, 0.3222], "deeplabv1_largefov": [0.3228, 0.3074], "segnet_basic": [0.2958, 0.2952],
             "segnet": [0.2366, 0.2561]},
    "val": {"unet_original": [0.4168, 0.464], "fcn8s": [0.4695, 0.4722], "deeplabv3plus": [0.4309, 0.4168],
            "pspnet": [0.4322, 0.4405], "deeplabv1_largefov": [0.4032, 0.4178], "segnet_basic": [0.3672, 0.3898],
            "segnet": [0.2701, 0.2968]},
}
# The leaderboard before recipes (commit ea3f94a): one global recipe (AdamW 1e-3, poly), seed 0, test mIoU.
BEFORE = {"deeplabv3plus": 0.330, "pspnet": 0.305, "segnet_basic": 0.298, "unet_original": 0.281, "fcn8s": 0.260,
          "segnet": 0.252, "deeplabv1_largefov": 0.210}
# SegNet paper (Badrinarayanan et al. 2017), Table 1: CamVid, 367 training images, no pretraining, 360x480.
ANCHORS = [
    {"model": "SegNet-Basic (published)", "miou": 0.477},
    {"model": "FCN-Basic (published)", "miou": 0.473},
]


def resize_camvid(source: Path, target: Path, height: int = HEIGHT, width: int = WIDTH) -> None:
    """Resized copy of the CamVid folders (written once)."""
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


def options_for(name: str, recipe: str) -> dict:
    return {**ARCHS[name], **(PAPER_NETWORK.get(name, {}) if recipe == "shared" else {})}


def write_params(work: Path, recipe: str, seed: int) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] = {
        "format": "masks", "root": "camvid", "unlabeled": None, "strict": True,
        "masks": {"folders": [{"images": i, "masks": m, "split": i} for i, m in SPLITS.items()],
                  "classes": CLASSES, "ignore_value": VOID},
    }
    params["train"].update({
        "archs": list(ARCHS), "epochs": EPOCHS, "batch_size": BATCH, "crop_size": min(HEIGHT, WIDTH),
        "class_weighting": True, "class_weight_power": CLASS_WEIGHT_POWER[recipe], "use_pseudo_labels": False,
        "seed": seed,
        **(SHARED_RECIPE if recipe == "shared" else {}),
    })
    params["models"] = {name: options_for(name, recipe) for name in ARCHS}
    params["evaluate"]["num_overlays"] = 4
    # CamVid's published split keeps a test frame registered onto a training frame of one second before
    # (0001TP_008550 ~ 008520, reports/near_copies.md): validate would refuse it; the benchmarks keep the split.
    params["validate"]["allow_shared_pictures"] = True
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def segflow(work: Path, *args: str) -> None:
    command = [str(Path(sys.executable).parent / "segflow"), *args]
    print("+", work.name, " ".join(args), flush=True)
    subprocess.run(command, cwd=work, check=True)


def prepare(camvid: Path, work: Path) -> Path:
    """The resized images, ingested, validated, split and decoded once for every run."""
    prepared = work / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    resize_camvid(camvid, prepared / "camvid")
    write_params(prepared, "architecture", 0)
    if not (prepared / "data/cache/index.json").exists():
        segflow(prepared, "ingest", "from-params")
        segflow(prepared, "validate", "data/ingested", "--out", "data/validation")
        segflow(prepared, "split")
        segflow(prepared, "cache")
    return prepared


def train_and_evaluate(prepared: Path, folder: Path, name: str, recipe: str, seed: int,
                       edit: Callable[[dict], None] | None = None) -> Path:
    """``segflow train`` and ``evaluate`` of ``name`` in ``folder`` (the prepared data linked in, params.yaml
    written for ``recipe`` and ``seed``, then changed by ``edit``), unless done before (a killed training resumes);
    returns its scores file."""
    scores_file = folder / "evaluation" / name / "scores.json"
    if not scores_file.exists():
        folder.mkdir(parents=True, exist_ok=True)
        for shared in ("camvid", "data"):
            if not (folder / shared).exists():
                (folder / shared).symlink_to(prepared / shared)
        write_params(folder, recipe, seed)
        if edit is not None:
            params = yaml.safe_load((folder / "params.yaml").read_text())
            edit(params)
            (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        started = time.perf_counter()
        resume = ["--resume"] if (folder / "models" / f".{name}.resume").exists() else []
        segflow(folder, "train", "--arch", name, *resume)
        segflow(folder, "evaluate", "--arch", name)
        print(f"{name} in {folder.name}: {time.perf_counter() - started:.0f} s", flush=True)
    return scores_file


def run(prepared: Path, work: Path, name: str, recipe: str, seed: int) -> dict:
    """Train and evaluate one architecture with one recipe and seed (cached), and return its scores."""
    folder = work / f"{recipe}-seed-{seed}"
    scores = json.loads(train_and_evaluate(prepared, folder, name, recipe, seed).read_text())
    card = json.loads((folder / "models" / name / "model.json").read_text())
    return {"test": scores["test"], "val": scores["val"], "majority": scores["majority_baseline"],
            "parameters": scores["parameters"], "train_seconds": scores["train_seconds"],
            "recipe": card.get("extra", {}).get("recipe", "")}  # the recipe the training used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--camvid", type=Path, default=REPO.parent / "shared/datasets/camvid")
    parser.add_argument("--work", type=Path, default=REPO / ".bench/camvid")
    parser.add_argument("--out", type=Path, default=REPO / "reports/camvid_leaderboard")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report the architectures whose every recipe and seed has finished")
    args = parser.parse_args()

    work = args.work.resolve() / f"{HEIGHT}x{WIDTH}-epochs-{EPOCHS}-batch-{BATCH}"
    if args.report_only:
        args.archs = [name for name in args.archs if all(
            (work / f"{recipe}-seed-{seed}" / "evaluation" / name / "scores.json").exists()
            for recipe in args.recipes for seed in args.seeds)]
    prepared = work / "prepared" if args.report_only else prepare(args.camvid.resolve(), work)
    # Seed by seed, so that a stopped run has whole seeds of every recipe to report.
    results = {(name, recipe, seed): run(prepared, work, name, recipe, seed)
               for seed in args.seeds for recipe in args.recipes for name in args.archs}
    rows = [_row(name, {key[1:]: value for key, value in results.items() if key[0] == name}, args)
            for name in args.archs]
    rows.sort(key=lambda row: -row["architecture"]["mean"] if "architecture" in row else 0)
    budget = {
        "resolution": [HEIGHT, WIDTH], "epochs": EPOCHS, "batch": BATCH, "crop": min(HEIGHT, WIDTH),
        "class_weighting": "median frequency (architecture: square roots)", "pretraining": "none", "seeds": args.seeds,
        "device": os.environ.get("SEGFLOW_BENCH_DEVICE", _device()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"budget": budget, "shared_recipe": SHARED_RECIPE, "results": rows, "anchors": ANCHORS,
              "before": BEFORE}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(report, args.recipes))
    print(_markdown(report, args.recipes))


def _row(name: str, runs: dict, args: argparse.Namespace) -> dict:
    row: dict = {"model": name}
    for recipe in args.recipes:
        scores = [runs[recipe, seed] for seed in args.seeds]
        mious = [s["test"]["miou"] for s in scores]
        row[recipe] = {
            "options": options_for(name, recipe), "recipe": scores[0]["recipe"],
            "test_miou": mious, "mean": statistics.fmean(mious), "min": min(mious), "max": max(mious),
            "val_miou": [s["val"]["miou"] for s in scores],
            "mean_class_accuracy": statistics.fmean(s["test"]["mean_class_accuracy"] for s in scores),
            "pixel_accuracy": statistics.fmean(s["test"]["pixel_accuracy"] for s in scores),
            "parameters": scores[0]["parameters"],
            "train_minutes": statistics.fmean(s["train_seconds"] for s in scores) / 60,
        }
        row["majority_test_miou"] = scores[0]["majority"]["miou"]  # predicting the majority class everywhere
    return row


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _spread(values: list[float]) -> str:
    return f"{_pct(statistics.fmean(values))} [{_pct(min(values))}, {_pct(max(values))}]"


def _markdown(report: dict, recipes: list[str]) -> str:
    budget, rows = report["budget"], report["results"]
    seeds = budget["seeds"]
    ours = "architecture" in recipes
    lines = [
        "# CamVid leaderboard (from scratch): each architecture's recipe against the shared one",
        "",
        *([f"**Partial: {len(rows)} of the {len(ARCHS)} architectures have finished every recipe and seed.**", ""]
          if len(rows) < len(ARCHS) else []),
        "Budget: " + ", ".join(f"{k} {v}" for k, v in budget.items()) + ". "
        "Test split: 233 images, 11 classes, void ignored. Selection (the kept epoch) on val, scores on test.",
        "",
        f"Test mIoU, mean over seeds {seeds} with [min, max]. `shared` is the control: "
        + ", ".join(f"{k} {v}" for k, v in report["shared_recipe"].items())
        + ", the papers' networks (no batch norm in FCN, U-Net, DeepLab v1), SegNet's median frequency weights. "
        "`architecture`: each one's recipe (below), default options, and the square roots of those weights "
        "(`train.class_weight_power: 0.5`). `full weights`: the recipes with SegNet's full weights, the run before "
        "(commit 6224f48), which tells what the square roots changed.",
        "",
    ]
    both = all(recipe in recipes for recipe in RECIPES)
    columns = [f"{r} mIoU" for r in recipes]
    if ours:
        columns.insert(recipes.index("architecture") + 1, "full weights")
    columns += (["gain over shared"] if both else []) + ["before (ea3f94a)", "gain over before"] \
        + (["val: architecture / full weights"] if ours else []) \
        + ["majority class", "mean class acc.", "params (M)", "train (min)"]
    lines += ["| model | options | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for row in rows:
        name, main = row["model"], row[recipes[0]]
        cells = [_spread(row[r]["test_miou"]) for r in recipes]
        if ours:
            cells.insert(recipes.index("architecture") + 1, _spread(FULL_WEIGHTS["test"][name]))
        if both:
            cells.append(f"{100 * (row['architecture']['mean'] - row['shared']['mean']):+.1f}")
        cells += [_pct(BEFORE[name]), f"{100 * (main['mean'] - BEFORE[name]):+.1f}"]
        if ours:
            cells.append(f"{_pct(statistics.fmean(row['architecture']['val_miou']))} / "
                         f"{_pct(statistics.fmean(FULL_WEIGHTS['val'][name]))}")
        cells += [_pct(row["majority_test_miou"]), _pct(main["mean_class_accuracy"]), f"{main['parameters'] / 1e6:.1f}",
                  f"{main['train_minutes']:.1f}"]
        lines.append(f"| {name} | {main['options']} | " + " | ".join(cells) + " |")
    means = {r: statistics.fmean(row[r]["mean"] for row in rows) for r in recipes}
    before = statistics.fmean(BEFORE[row["model"]] for row in rows)
    cells = [_pct(means[r]) for r in recipes]
    if ours:
        cells.insert(recipes.index("architecture") + 1,
                     _pct(statistics.fmean(statistics.fmean(FULL_WEIGHTS["test"][row["model"]]) for row in rows)))
    if both:
        cells.append(f"{100 * (means['architecture'] - means['shared']):+.1f}")
    cells += [_pct(before), f"{100 * (means[recipes[0]] - before):+.1f}"]
    if ours:
        val = statistics.fmean(statistics.fmean(row["architecture"]["val_miou"]) for row in rows)
        cells.append(f"{_pct(val)} / {_pct(statistics.fmean(statistics.fmean(FULL_WEIGHTS['val'][row['model']]) for row in rows))}")
    lines.append(f"| **mean of {len(rows)}** | | " + " | ".join(cells) + " |" + " |" * 4)
    for anchor in ANCHORS:
        lines.append(f"| {anchor['model']} | 360×480, trained to convergence | {_pct(anchor['miou'])} |"
                     + " |" * (len(columns) - 1))
    if ours:
        lines += ["", "Recipes (`architecture`):", ""]
        lines += [f"- **{row['model']}**: {row['architecture']['recipe']}" for row in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
