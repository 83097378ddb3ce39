"""Semi-supervised CamVid: does pseudo-labeling pay off when labels are scarce?

    python benchmarks/semisup_camvid.py --camvid ../shared/datasets/camvid --fractions 0.125 0.25

For each labeled fraction, ``split.labeled_fraction`` keeps a seeded share of CamVid's 367 training images
labeled and hides the masks of the rest (they become the unlabeled pool, their masks used only to score the
pseudo-labels). segflow's own self-training (``segflow.self_training.self_train``) then trains the labeled-only
model (round 0, the "labeled-only" arm) and the self-training rounds (the "pseudo-labeled" arm: teacher TTA,
class-balanced thresholds with the class weighting's bias undone, ST++ reliability, strong augmentation,
labeled oversampling), each student seeing each labeled image as often as round 0 did and fine-tuning its teacher
(``--student-init scratch``: from random weights). No pretrained weights anywhere. A labeled-only control trains
for as many steps as the first student (from round 0 when the students fine-tune). Every model is scored on the
233 test images; the pseudo-labeled arm's model is the round its validation mIoU picks.

    python benchmarks/semisup_camvid.py --steps 400 --rounds 4 --tag=-v4   # a try: work folders get the tag;
                                                                            # round 0 is shared between tries

Writes ``reports/semisup_camvid.{json,md}`` (fraction, arm, round, test mIoU, and the pseudo-labels' quality).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from camvid_leaderboard import CLASSES, REPO, SPLITS, VOID, resize_camvid  # noqa: E402

from segflow.config import DataParams, parse_params  # noqa: E402
from segflow.evaluate import evaluate  # noqa: E402
from segflow.ingest import ingest_from_params  # noqa: E402
from segflow.self_training import self_train  # noqa: E402
from segflow.split import make_splits  # noqa: E402
from segflow.inference import CARD_FILE, read_card  # noqa: E402
from segflow.train import train  # noqa: E402
from segflow.validate import validate  # noqa: E402


def benchmark_params(args: argparse.Namespace, labeled_images: int) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # Round 0 gets `steps` optimizer steps; every student the same (self_train matches the images seen).
    steps_per_epoch = max(1, labeled_images // args.batch)
    params["train"].update({
        "archs": [args.arch], "batch_size": args.batch, "crop_size": min(args.height, args.width),
        "optimizer": "adamw", "lr": args.lr, "lr_schedule": "poly", "class_weighting": True, "seed": 0,
        "device": "auto", "pseudo_weight": 1.0, "oversample_labeled": True,
        "decoded_cache": False,  # the cache is the DVC stage's output; this script decodes the resized copy
    })
    params["teacher"] = {"arch": args.arch, "epochs": math.ceil(args.steps / steps_per_epoch), "snapshots": 2,
                         "rounds": args.rounds, "min_improvement": 0.0, "student_init": args.student_init}
    params["pseudo_label"] = {"threshold": args.threshold, "batch_size": 16, "class_balanced": True,
                              "class_keep_fraction": 0.5, "reliable_fraction": args.reliable_fraction,
                              "prior_correction": args.prior_correction if args.prior_correction == "auto"
                              else float(args.prior_correction)}
    params["evaluate"].update({"num_overlays": 0, "inference": {"mode": "whole", "flip": True,
                                                                "scales": [0.75, 1.0, 1.25]}})
    params["models"] = {args.arch: {"encoder_name": "resnet18", "encoder_weights": None}}
    if not args.strong_augment:
        params["train"]["pseudo_augment"] = {"color_jitter": 0, "grayscale": 0, "blur": 0, "cutout": 0}
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--camvid", type=Path, default=REPO.parent / "shared/datasets/camvid")
    parser.add_argument("--work", type=Path, default=REPO / ".bench/semisup")
    parser.add_argument("--out", type=Path, default=REPO / "reports/semisup_camvid")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25])
    parser.add_argument("--arch", default="deeplabv3plus")
    parser.add_argument("--height", type=int, default=72)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--reliable-fraction", type=float, default=0.5)
    parser.add_argument("--prior-correction", default="auto",
                        help="pseudo_label.prior_correction: auto, or 0 to 1 (0: the teacher's probabilities as they are)")
    parser.add_argument("--student-init", choices=["scratch", "teacher"], default="teacher",
                        help="teacher.student_init: students from random weights, or fine-tuning their teacher")
    parser.add_argument("--tag", default="", help="suffix of this try's work folders (round 0 is shared)")
    parser.add_argument("--strong-augment", action=argparse.BooleanOptionalAction, default=True,
                        help="strong augmentation of pseudo-labeled images (train.pseudo_augment)")
    args = parser.parse_args()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    resize_camvid(args.camvid.resolve(), work / "camvid", args.height, args.width)
    size = f"{args.height}x{args.width}"  # work folders per resolution: the resized copy is replaced
    data_dir = work / f"ingested-{size}"
    if not (data_dir / "manifest.csv").exists():
        ingest_from_params(DataParams(
            format="masks", root=work / "camvid", unlabeled=None, strict=True,
            masks={"folders": [{"images": i, "masks": m, "split": i} for i, m in SPLITS.items()],
                   "classes": CLASSES, "ignore_value": VOID},
        ), data_dir)
    stats_csv = work / f"validation-{size}" / "stats.csv"
    if not stats_csv.exists():
        validate(data_dir, stats_csv.parent, min_train=8, min_val=2, min_test=2, val_fraction=0.15,
                 test_fraction=0.2)

    setup = {
        "arch": f"{args.arch} (resnet18, from scratch)", "resolution": [args.height, args.width],
        "steps_per_round": args.steps, "batch": args.batch, "optimizer": f"AdamW lr {args.lr}, poly",
        "class_weighting": "median frequency", "teacher_tta": "flip + scales 0.75/1/1.25",
        "evaluation": "same TTA for every model", "threshold": f"{args.threshold}, class-balanced (keep 0.5)",
        "reliable_fraction_round_1": args.reliable_fraction, "rounds": args.rounds,
        "stopping_rule": "a round must raise val mIoU", "strong_augment": args.strong_augment,
        "prior_correction": args.prior_correction, "student_init": args.student_init, "device": _device(),
    }
    rows, table = [], []
    for fraction in args.fractions:
        base_dir = work / f"{size}-fraction-{fraction:g}-steps-{args.steps}"
        run_dir = base_dir.with_name(base_dir.name + ("" if args.strong_augment else "-weak") + args.tag)
        splits_csv = run_dir / "splits.csv"
        run_dir.mkdir(exist_ok=True)
        if run_dir != base_dir and (base_dir / "rounds/round_0/round.json").exists():
            # The labeled-only round does not depend on how pseudo-labels are made: shared by every try.
            shutil.copytree(base_dir / "rounds/round_0", run_dir / "rounds/round_0", dirs_exist_ok=True)
        frame = make_splits(data_dir, stats_csv, splits_csv, seed=0, val_fraction=0.15, test_fraction=0.2,
                            labeled_fraction=fraction)
        labeled = int((frame["split"] == "train").sum())
        params = parse_params(benchmark_params(args, labeled), f"benchmark params (fraction {fraction})")
        rows_file = run_dir / "rows.json"
        if rows_file.exists():  # finished by an earlier run of this script
            rows += json.loads(rows_file.read_text())
        else:
            started = time.perf_counter()
            fraction_rows = run_fraction(params, fraction, labeled, data_dir, splits_csv, run_dir, base_dir.name)
            for row in fraction_rows:
                row["minutes"] = (time.perf_counter() - started) / 60
            rows_file.write_text(json.dumps(fraction_rows, indent=2))
            rows += fraction_rows
        minutes = next(r for r in rows if r["fraction"] == fraction)["minutes"]
        baseline = next(r for r in rows if r["fraction"] == fraction and r["arm"] == "labeled-only")["test_miou"]
        mine = [r for r in rows if r["fraction"] == fraction]
        control = next((r["test_miou"] for r in mine if r["arm"].startswith("labeled-only, as many")), None)
        # The pseudo-labeled arm's model is the round its own validation score picks (test never chooses).
        students = [r for r in mine if r["arm"] == "pseudo-labeled"]
        student = max(students, key=lambda r: r["val_miou"]) if students else None
        table.append({
            "fraction": fraction, "labeled_images": labeled, "labeled_only": baseline, "labeled_only_long": control,
            "pseudo_labeled": student and student["test_miou"], "pseudo_round": student and student["round"],
            "gain": student and student["test_miou"] - baseline,
            "gain_over_long": student and control is not None and student["test_miou"] - control,
            "minutes": minutes,
        })
        # Rewritten after every fraction, so a long run leaves its finished figures behind.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(
            json.dumps({"setup": setup, "rows": rows, "summary": table}, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(_markdown(setup, rows, table))
        print(_markdown(setup, rows, table))


def run_fraction(
    params, fraction: float, labeled: int, data_dir: Path, splits_csv: Path, run_dir: Path, base_name: str,
) -> list[dict]:
    """The self-training rounds, and a labeled-only control trained for as many steps as the first student
    (fine-tuning the labeled-only model when the students fine-tune their teacher)."""
    records = self_train(params, data_dir=data_dir, splits_csv=splits_csv, work_dir=run_dir / "rounds")
    batch = params.train.batch_size
    if len(records) > 1:
        student_steps = records[1]["epochs"] * (records[1]["train_images"] // batch)
        control_epochs = math.ceil(student_steps / max(1, labeled // batch))
        from_teacher = params.teacher.student_init == "teacher"
        control_dir = run_dir.parent / f"{base_name}-control-{control_epochs}-epochs{'-from-teacher' if from_teacher else ''}"
        if not (control_dir / CARD_FILE).exists():  # shared by the runs that differ only in the pseudo-labeled arm
            train(params, params.teacher.arch, data_dir=data_dir, splits_csv=splits_csv, out_dir=control_dir,
                  epochs=control_epochs, run_name="labeled-only control",
                  init_from=Path(records[0]["model_dir"]) if from_teacher else None)
        records.append({"round": 0, "control": True, "val_miou": read_card(control_dir).extra["val_miou"],
                        "epochs": control_epochs, "model_dir": str(control_dir), "best": False})
    rows = []
    for record in records:
        name = "control" if record.get("control") else f"round_{record['round']}"
        metrics = evaluate(params, name, model_dir=Path(record["model_dir"]), data_dir=data_dir,
                           splits_csv=splits_csv, metrics_file=run_dir / "metrics" / f"{name}.json",
                           out_dir=run_dir / "evaluation" / name, plots_dir=run_dir / "plots")
        arm = "pseudo-labeled" if record["round"] else "labeled-only"
        if record.get("control"):
            arm = "labeled-only, as many steps as round 1"
            if params.teacher.student_init == "teacher":
                arm += ", fine-tuning round 0"
        row = {
            "fraction": fraction, "labeled_images": labeled, "arm": arm, "round": record["round"],
            "test_miou": metrics["miou"], "val_miou": record["val_miou"], "epochs": record["epochs"],
            "coverage": record.get("coverage"), "pseudo_accuracy": record.get("pseudo_accuracy"),
            "prior_correction": record.get("prior_correction"),
            "kept": record["best"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def _blank(value) -> str:
    return "" if value is None else f"{value:g}"


def _markdown(setup: dict, rows: list[dict], table: list[dict]) -> str:
    lines = [
        "# Semi-supervised CamVid: labeled-only against pseudo-labeled",
        "",
        "Setup: " + "; ".join(f"{k} {v}" for k, v in setup.items()) + ". Test split: 233 images, 11 classes.",
        "",
        "| labeled | arm | round | test mIoU | val mIoU | pseudo coverage | pseudo accuracy | prior correction | kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        quality = (f"{100 * r['coverage']:.1f}%", f"{100 * r['pseudo_accuracy']:.1f}%") if r["coverage"] is not None else ("", "")
        lines.append(f"| {r['fraction']:g} ({r['labeled_images']}) | {r['arm']} | {r['round']} | {100 * r['test_miou']:.1f} "
                     f"| {100 * r['val_miou']:.1f} | {quality[0]} | {quality[1]} | {_blank(r.get('prior_correction'))} "
                     f"| {'yes' if r['kept'] else ''} |")
    lines += ["", "| labeled | labeled-only | labeled-only, student's steps | pseudo-labeled (round by val) | gain | "
              "gain over the longer control | time (min) |", "|---|---|---|---|---|---|---|"]

    def pct(value, sign=""):
        return "" if value is None else f"{100 * value:{sign}.1f}"

    for t in table:
        lines.append(f"| {t['fraction']:g} ({t['labeled_images']}) | {pct(t['labeled_only'])} | "
                     f"{pct(t['labeled_only_long'])} | {pct(t['pseudo_labeled'])} (round {t['pseudo_round']}) | "
                     f"{pct(t['gain'], '+')} | {pct(t['gain_over_long'], '+')} | {t['minutes']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
