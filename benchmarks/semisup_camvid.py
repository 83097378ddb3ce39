"""Semi-supervised CamVid: do the unlabeled images pay, and how much room is there for them to pay?

    nice python benchmarks/semisup_camvid.py --camvid ../shared/datasets/camvid --fractions 0.0625 0.125 --seeds 0 1

For each labeled fraction and seed, ``split.labeled_fraction`` keeps a seeded share of CamVid's 367 training
images labeled (the seed draws the subset and the initial weights) and hides the masks of the rest, which become
the unlabeled pool. Three arms train the same model from scratch through ``segflow.train.train``:

- ``labeled-only``: the labeled images alone, Mean Teacher weights (``train.ema``) evaluated;
- ``semi-supervised``: the same, plus weak-to-strong consistency on the unlabeled images (``train.consistency``:
  FixMatch/UniMatch with CutMix, targets from the Mean Teacher in eval mode, the strong views in a forward pass
  of their own, unweighted unlabeled loss, ramp-up): same optimizer steps, same initial weights, same seed;
- ``oracle``: every training mask (what perfect pseudo-labels could give at most), one model per seed for every
  fraction, trained longer (``--oracle-steps``) so that its val score has stopped rising.

Headroom = oracle - labeled-only: the room any use of the unlabeled images has. Every arm validates about ten
times; the row gives the test mIoU of the checkpoint val picked (``test_miou``) and of the final weights
(``test_miou_last``), and the step at which val peaked. CamVid's val split is one 6.7-second clip between two
training frames, so val picks only the checkpoint; the figures compared are test's.

Each finished run is cached in the work folder (``--work``): running again trains only what is missing, so a
stopped benchmark resumes. Writes ``reports/semisup_camvid.json`` (setup, rows of ``fraction``, ``seed``,
``arm``, ``round``, ``test_miou``, ``val_miou``, ``steps``, ``minutes``, ...; summary per fraction) and the
Markdown beside it, after every finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from camvid_leaderboard import CLASSES, REPO, SPLITS, VOID, resize_camvid

from segflow.card import LAST_DIR, read_card
from segflow.config import DataParams, Params, parse_params
from segflow.ingest import ingest_from_params
from segflow.metrics import score_split
from segflow.split import make_splits
from segflow.train import train
from segflow.validate import validate

ARMS = ("labeled-only", "semi-supervised", "oracle")
VALIDATIONS = 10  # per training: enough to see where val peaks


def arm_params(args: argparse.Namespace, arm: str, seed: int, train_images: int) -> Params:
    """The benchmark's settings for one arm: the same for all but the unlabeled loss and the budget."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    steps = args.oracle_steps if arm == "oracle" else args.steps
    steps_per_epoch = max(1, train_images // args.batch)
    epochs = max(1, round(steps / steps_per_epoch))
    params["train"].update({
        "archs": [args.arch], "epochs": epochs, "batch_size": args.batch, "crop_size": args.crop,
        "optimizer": "adamw", "lr": args.lr, "weight_decay": 1e-4, "lr_schedule": "poly",
        "class_weighting": args.class_weighting, "unlabeled_class_weighting": "none", "seed": seed,
        "device": "auto", "decoded_cache": False, "val_interval": max(1, epochs // VALIDATIONS),
        "use_pseudo_labels": False,
        "ema": {"decay": args.ema_decay, "evaluate": True},
        "consistency": {"weight": args.consistency if arm == "semi-supervised" else 0.0,
                        "threshold": args.threshold, "cutmix": 0.5, "rampup": args.rampup},
    })
    params["evaluate"].update({"batch_size": 16, "num_overlays": 0,
                               "inference": {"mode": "whole", "flip": False, "scales": [1.0]}})
    params["models"] = {args.arch: json.loads(args.model_options)}
    return parse_params(params, f"benchmark params ({arm})")


def run_arm(args, arm: str, fraction: float | None, seed: int, data_dir: Path, stats_csv: Path, work: Path) -> dict:
    """Train and score one arm (cached in its folder: a second call reads the row)."""
    name = "oracle" if arm == "oracle" else f"fraction-{fraction:g}-{arm}"
    run_dir = work / f"seed-{seed}" / name
    row_file = run_dir / "row.json"
    if row_file.exists():
        return json.loads(row_file.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    splits_csv = run_dir / "splits.csv"
    frame = make_splits(data_dir, stats_csv, splits_csv, seed=seed, val_fraction=0.15, test_fraction=0.2,
                        labeled_fraction=None if arm == "oracle" else fraction)
    labeled = int((frame["split"] == "train").sum())
    params = arm_params(args, arm, seed, labeled)
    model_dir = run_dir / "model"
    result = train(params.train, args.arch, model_options=params.models.get(args.arch, {}), mlflow_cfg=params.mlflow,
                   val_batch_size=params.evaluate.batch_size, data_dir=data_dir, splits_csv=splits_csv, out_dir=model_dir,
                   run_name=f"{arm} seed {seed}", keep_last=True)
    scoring = {"device": params.train.device, "batch_size": params.evaluate.batch_size,
               "inference": params.evaluate.inference, "train_crop_size": params.train.crop_size}
    test = score_split(model_dir, data_dir, splits_csv, "test", **scoring)
    last_dir = model_dir / LAST_DIR
    test_last = score_split(last_dir, data_dir, splits_csv, "test", **scoring)["miou"] if last_dir.is_dir() else test["miou"]
    steps_per_epoch = max(1, labeled // params.train.batch_size)
    row = {
        "fraction": fraction, "seed": seed, "arm": arm, "round": 0, "labeled_images": labeled,
        "test_miou": test["miou"], "test_miou_last": test_last, "val_miou": result.best_miou,
        "steps": params.train.epochs * steps_per_epoch, "best_step": result.best_epoch * steps_per_epoch,
        "minutes": read_card(model_dir).extra["train_seconds"] / 60,
        "val_curve": [[r["epoch"] * steps_per_epoch, r["val_miou"]] for r in result.history if "val_miou" in r],
        "per_class_iou": dict(zip(CLASSES, test["per_class_iou"])),
    }
    row_file.write_text(json.dumps(row, indent=2) + "\n")
    return row


def summarise(rows: list[dict], fractions: list[float]) -> list[dict]:
    """Per fraction: each arm's mean and spread over seeds, the gain over the equal-budget control and the
    oracle's headroom (over the seeds both arms have)."""
    oracle = {r["seed"]: r["test_miou"] for r in rows if r["arm"] == "oracle"}
    table = []
    for fraction in fractions:
        by_arm = {arm: {r["seed"]: r for r in rows if r["fraction"] == fraction and r["arm"] == arm}
                  for arm in ARMS[:2]}
        seeds = sorted(set(by_arm["labeled-only"]) & set(by_arm["semi-supervised"]))
        gains = [by_arm["semi-supervised"][s]["test_miou"] - by_arm["labeled-only"][s]["test_miou"] for s in seeds]
        headrooms = [oracle[s] - by_arm["labeled-only"][s]["test_miou"] for s in by_arm["labeled-only"] if s in oracle]
        entry = {"fraction": fraction, "seeds": seeds,
                 "labeled_images": next(iter(by_arm["labeled-only"].values()), {}).get("labeled_images")}
        for arm, runs in [*by_arm.items(), ("oracle", {s: {"test_miou": v} for s, v in oracle.items()})]:
            entry[arm] = _mean_spread([r["test_miou"] for r in runs.values()])
        entry["gain"] = _mean_spread(gains)
        entry["headroom"] = _mean_spread(headrooms)
        entry["recovered"] = (entry["gain"]["mean"] / entry["headroom"]["mean"]
                              if gains and headrooms and entry["headroom"]["mean"] > 0 else None)
        table.append(entry)
    return table


def _mean_spread(values: list[float]) -> dict:
    """Mean and spread (max - min) over seeds; None when there is nothing yet."""
    if not values:
        return {"mean": None, "spread": None, "n": 0}
    return {"mean": statistics.fmean(values), "spread": max(values) - min(values), "n": len(values)}


def _pct(value: float | None, sign: str = "") -> str:
    return "" if value is None else f"{100 * value:{sign}.1f}"


HISTORY = """## History: the nine earlier tries (replaced by this report)

Tries 1 to 9 (DeepLabV3+-ResNet18 from scratch, mostly 72x96 with a 72-pixel crop padded to 96, one seed, one
labeled subset, every choice made on val) compared offline self-training rounds (ST++ reliability, class-balanced
thresholds, prior correction, strong augmentation) and weak-to-strong consistency with a labeled-only control
trained as long. None beat it: at 1/8 labels the best try was -0.0 against the control, the self-training rounds
+1.7 over labeled-only but -2.0 against the control at 144x192, and the long-budget try (3000 steps) -1.8
(consistency 33.1 against 34.9). Its oracle (36.4, +1.5) got as many steps as the 46-image model, 9 times fewer
epochs, so it was under-trained and "perfect labels are worth less than +5" did not follow. The review of that
method found consistency targets predicted in training mode (dropout on, the batch's own statistics), strong views
in the labeled images' batch-norm batch, rare-class weights up to 65x on unlabeled pixels, no Mean Teacher and no
ramp-up: all fixed before the runs above. At 72x96 and output stride 16 the 6x6 feature map also capped the thin
classes (Pole at most 13 IoU); this report uses 96x128 and a U-Net.
"""


def _share(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def markdown(setup: dict, rows: list[dict], table: list[dict]) -> str:
    lines = ["# Semi-supervised CamVid: labeled-only, semi-supervised (Mean Teacher + weak-to-strong consistency), oracle",
             "", "Setup: " + "; ".join(f"{k} {v}" for k, v in setup.items()) + ".", "",
             "| labeled | labeled-only | semi-supervised | gain (semi - labeled-only) | oracle | headroom "
             "(oracle - labeled-only) | share of headroom recovered | seeds |", "|---|---|---|---|---|---|---|---|"]

    def cell(stat: dict, sign: str = "") -> str:
        if stat["mean"] is None:
            return ""
        return f"{_pct(stat['mean'], sign)} (spread {_pct(stat['spread'])}, n={stat['n']})"

    for t in table:
        lines.append(f"| {t['fraction']:g} ({t['labeled_images']}) | {cell(t['labeled-only'])} | "
                     f"{cell(t['semi-supervised'])} | {cell(t['gain'], '+')} | {cell(t['oracle'])} | "
                     f"{cell(t['headroom'], '+')} | {_share(t['recovered'])} | {', '.join(map(str, t['seeds']))} |")
    lines += ["", "Every run (test mIoU of the checkpoint val picked, and of the final weights; the step at which val "
              "peaked out of the steps trained):", "",
              "| labeled | seed | arm | test mIoU | test mIoU, final weights | val mIoU | best step / steps | minutes |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["fraction"] or 1, r["arm"], r["seed"])):
        fraction = "all (367)" if r["fraction"] is None else f"{r['fraction']:g} ({r['labeled_images']})"
        lines.append(f"| {fraction} | {r['seed']} | {r['arm']} | {_pct(r['test_miou'])} | {_pct(r['test_miou_last'])} "
                     f"| {_pct(r['val_miou'])} | {r['best_step']} / {r['steps']} | {r['minutes']:.1f} |")
    lines += per_class_table(rows, sorted({r["fraction"] for r in rows if r["fraction"] is not None}))
    return "\n".join(lines) + "\n\n" + HISTORY


def per_class_table(rows: list[dict], fractions: list[float]) -> list[str]:
    """Test IoU per class, mean over seeds: where the unlabeled images help or hurt, and what labels would give."""
    columns = [(f"{arm} {fraction:g}", [r for r in rows if r["arm"] == arm and r["fraction"] == fraction])
               for fraction in fractions for arm in ARMS[:2]]
    columns.append(("oracle", [r for r in rows if r["arm"] == "oracle"]))
    columns = [(title, runs) for title, runs in columns if runs]
    lines = ["", "Test IoU per class (mean over seeds):", "", "| class | " + " | ".join(t for t, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name in CLASSES:
        lines.append(f"| {name} | " + " | ".join(_pct(statistics.fmean(r["per_class_iou"][name] for r in runs))
                                                 for _, runs in columns) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--camvid", type=Path, default=REPO.parent / "shared/datasets/camvid")
    parser.add_argument("--work", type=Path, default=REPO / ".bench/semisup")
    parser.add_argument("--out", type=Path, default=REPO / "reports/semisup_camvid")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0625, 0.125])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    # Ronneberger's U-Net at a quarter width (1.9M parameters): the from-scratch U-Net of UniMatch's ACDC setting,
    # at 0.27 s per labeled step on 2 cores (U-Net-ResNet18: 0.49 s), so every arm gets two seeds on a CPU.
    parser.add_argument("--arch", default="unet_original")
    parser.add_argument("--model-options", default='{"width": 0.25}', help="the architecture's builder options (JSON)")
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of labeled-only and semi-supervised")
    parser.add_argument("--oracle-steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--class-weighting", action=argparse.BooleanOptionalAction, default=True,
                        help="median-frequency class weights on labeled pixels (never on unlabeled ones)")
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--consistency", type=float, default=1.0)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--rampup", type=float, default=0.1)
    args = parser.parse_args()

    size = f"{args.height}x{args.width}"
    work = args.work.resolve()
    setting = (f"{size}-{args.arch}-crop{args.crop}-b{args.batch}-lr{args.lr:g}-steps{args.steps}-oracle"
               f"{args.oracle_steps}-ema{args.ema_decay:g}-w{args.consistency:g}-t{args.threshold:g}"
               f"-r{args.rampup:g}{'-cw' if args.class_weighting else ''}")
    runs = work / setting  # one folder per setting: a run under other settings never reuses these models
    runs.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    resize_camvid(args.camvid.resolve(), work / f"camvid-{size}", args.height, args.width)
    data_dir = work / f"ingested-{size}"
    if not (data_dir / "manifest.csv").exists():
        ingest_from_params(DataParams(
            format="masks", root=work / f"camvid-{size}", unlabeled=None, strict=True,
            masks={"folders": [{"images": i, "masks": m, "split": i} for i, m in SPLITS.items()],
                   "classes": CLASSES, "ignore_value": VOID},
        ), data_dir)
    stats_csv = work / f"validation-{size}" / "stats.csv"
    if not stats_csv.exists():
        validate(data_dir, stats_csv.parent, min_train=8, min_val=2, min_test=2, val_fraction=0.15,
                 test_fraction=0.2, min_labeled_pixel_fraction=0.1, min_foreground_image_fraction=0.1)

    setup = {
        "model": f"{args.arch} {args.model_options}, from scratch", "resolution": size, "crop": args.crop,
        "batch": args.batch, "optimizer": f"AdamW lr {args.lr:g}, poly, weight decay 1e-4",
        "steps": f"{args.steps} (labeled-only and semi-supervised), {args.oracle_steps} (oracle)",
        "labeled loss": "cross-entropy" + (", median-frequency class weights" if args.class_weighting else ""),
        "Mean Teacher": f"EMA decay {args.ema_decay:g}, its weights evaluated (every arm)",
        "unlabeled loss": f"weight {args.consistency:g}, threshold {args.threshold:g}, CutMix 0.5, ramp-up over "
                          f"{args.rampup:.0%} of the steps, no class weights",
        "inference": "whole image, no TTA", "device": _device(),
        "minutes": "wall clock of each training, validation included, on a machine other jobs shared at times",
    }
    rows: list[dict] = []
    plan = []  # seed by seed, so that a stopped run leaves whole seeds behind
    for seed in args.seeds:
        plan += [(arm, fraction, seed) for fraction in args.fractions for arm in args.arms if arm != "oracle"]
        plan += [("oracle", None, seed)] if "oracle" in args.arms else []
    for arm, fraction, seed in plan:
        rows.append(run_arm(args, arm, fraction, seed, data_dir, stats_csv, runs))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("per_class_iou", "val_curve")}), flush=True)
        table = summarise(rows, args.fractions)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(
            json.dumps({"setup": setup, "rows": rows, "summary": table}, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(setup, rows, table))
    print(markdown(setup, rows, summarise(rows, args.fractions)))


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
