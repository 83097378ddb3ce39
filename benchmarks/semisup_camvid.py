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
233 test images; the semi-supervised model is the one (round or arm) its validation mIoU picks.

``--consistency 1`` adds the online arm (``train.consistency``: weak-to-strong consistency with CutMix on the
unlabeled images); ``--consistency-init teacher`` makes it fine-tune round 0 for as many steps as the first
student, against the same labeled-only control.

    python benchmarks/semisup_camvid.py --steps 400 --rounds 4 --tag=-v4   # a try: work folders get the tag;
                                                                            # round 0 is shared between tries

Every model and score stays in the work folder, so running again adds only what is new. Time is the models'
training time (pseudo-labeling and scoring left out).

Writes ``reports/semisup_camvid.{json,md}`` (fraction, arm, round, test mIoU, and the pseudo-labels' quality).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from camvid_leaderboard import CLASSES, REPO, SPLITS, VOID, resize_camvid  # noqa: E402

from segflow import CARD_FILE  # noqa: E402
from segflow.config import DataParams, parse_params  # noqa: E402
from segflow.evaluate import evaluate  # noqa: E402
from segflow.ingest import ingest_from_params  # noqa: E402
from segflow.self_training import self_train  # noqa: E402
from segflow.split import make_splits  # noqa: E402
from segflow.inference import read_card  # noqa: E402
from segflow.train import train  # noqa: E402
from segflow.validate import validate  # noqa: E402


VAL_STEPS = 50


def benchmark_params(args: argparse.Namespace, labeled_images: int) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # Round 0 gets `steps` optimizer steps; every student the same (self_train matches the images seen).
    steps_per_epoch = max(1, labeled_images // args.batch)
    params["train"].update({
        "archs": [args.arch], "batch_size": args.batch, "crop_size": min(args.height, args.width),
        "optimizer": "adamw", "lr": args.lr, "lr_schedule": "poly", "class_weighting": True, "seed": 0,
        "device": "auto", "pseudo_weight": 1.0, "oversample_labeled": True,
        "decoded_cache": False,  # the cache is the DVC stage's output; this script decodes the resized copy
        # Validated about every VAL_STEPS optimizer steps: with few labeled images an epoch is a handful of steps.
        "val_interval": max(1, VAL_STEPS // steps_per_epoch),
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
    parser.add_argument("--consistency", type=float, default=0.0,
                        help="also train the consistency arm: round 0's steps from scratch with "
                             "train.consistency.weight this (FixMatch/UniMatch on the unlabeled images)")
    parser.add_argument("--consistency-threshold", type=float, default=0.95)
    parser.add_argument("--consistency-init", choices=["scratch", "teacher"], default="scratch",
                        help="the consistency arm from random weights (round 0's epochs), or fine-tuning round 0 "
                             "(--consistency-epochs, against a labeled-only control fine-tuned as long)")
    parser.add_argument("--oracle", action="store_true",
                        help="also train with every training mask, as long as the first student (fine-tuning round "
                             "0 when it does) or, without rounds, as long as round 0: the most that perfect "
                             "pseudo-labels could give")
    parser.add_argument("--consistency-epochs", type=int, default=None,
                        help="default: round 0's from scratch; fine-tuning, the labeled-only control's of round 1")
    args = parser.parse_args()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    size = f"{args.height}x{args.width}"  # work folders per resolution: runs at two resolutions never mix
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
                 test_fraction=0.2)

    setup = {
        "arch": f"{args.arch} (resnet18, from scratch)", "resolution": [args.height, args.width],
        "steps_per_round": args.steps, "batch": args.batch, "optimizer": f"AdamW lr {args.lr}, poly",
        "class_weighting": "median frequency", "validation": f"every ~{VAL_STEPS} labeled-only steps (train.val_interval)",
        "teacher_tta": "flip + scales 0.75/1/1.25",
        "evaluation": "same TTA for every model", "threshold": f"{args.threshold}, class-balanced (keep 0.5)",
        "reliable_fraction_round_1": args.reliable_fraction, "rounds": args.rounds,
        "stopping_rule": "a round must raise val mIoU", "strong_augment": args.strong_augment,
        "prior_correction": args.prior_correction, "student_init": args.student_init,
        "consistency": f"weight {args.consistency}, threshold {args.consistency_threshold}, cutmix 0.5"
        if args.consistency else "off", "device": _device(),
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
        # Every model and score is kept in the work folders: a second run only adds what is new.
        oracle_splits = work / f"splits-all-labeled-{size}.csv"  # same val and test images (labeled_fraction moves train only)
        every_mask = make_splits(data_dir, stats_csv, oracle_splits, seed=0, val_fraction=0.15, test_fraction=0.2)
        rows += run_fraction(params, fraction, labeled, data_dir, splits_csv, run_dir, base_dir.name, args,
                             (oracle_splits, int((every_mask["split"] == "train").sum())))
        minutes = sum(r["train_minutes"] for r in rows if r["fraction"] == fraction)
        mine = [r for r in rows if r["fraction"] == fraction]
        baseline_row = next(r for r in mine if r["arm"] == "labeled-only")
        oracle_row = next((r for r in mine if r["arm"].startswith(ORACLE_ARM)), None)
        baseline = baseline_row["test_miou"]
        # The semi-supervised model is the one its own validation score picks (test never chooses).
        students = [r for r in mine if r["arm"] == "pseudo-labeled" or r["arm"].startswith(CONSISTENCY_ARM)]
        student = max(students, key=lambda r: r["val_miou"]) if students else None
        control = student and student.get("control_test_miou")
        table.append({
            "fraction": fraction, "labeled_images": labeled, "labeled_only": baseline, "labeled_only_long": control,
            "semi_supervised": student and student["test_miou"], "semi_supervised_arm": student and student["arm"],
            "semi_supervised_round": student and student["round"],
            "gain": student and student["test_miou"] - baseline,
            "oracle": oracle_row and oracle_row["test_miou"],
            "gain_over_long": None if student is None or control is None else student["test_miou"] - control,
            "minutes": minutes,
            # Which classes each arm gets right: where pseudo-labels help and hurt, and what real labels would give.
            "per_class_iou": {arm: per_class for arm, per_class in [
                ("labeled-only", baseline_row["per_class_iou"]),
                ("semi-supervised", student and student["per_class_iou"]),
                ("labeled-only, as long", student and student.get("control_per_class_iou")),
                ("oracle", oracle_row and oracle_row["per_class_iou"]),
            ] if per_class},
        })
        # Rewritten after every fraction, so a long run leaves its finished figures behind.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(
            json.dumps({"setup": setup, "rows": rows, "summary": table}, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(_markdown(setup, rows, table))
        print(_markdown(setup, rows, table))


CONSISTENCY_ARM = "weak-to-strong consistency"
ORACLE_ARM = "every training mask (oracle)"


def run_fraction(
    params, fraction: float, labeled: int, data_dir: Path, splits_csv: Path, run_dir: Path, base_name: str,
    args: argparse.Namespace, oracle: tuple[Path, int],
) -> list[dict]:
    """The self-training rounds, a labeled-only control trained for as many steps as the first student
    (fine-tuning the labeled-only model when the students fine-tune their teacher) and, with ``--consistency``,
    a model trained with weak-to-strong consistency on the unlabeled images: from scratch for round 0's steps, or
    fine-tuning round 0 against a labeled-only control fine-tuned for as many steps."""
    records = self_train(params, data_dir=data_dir, splits_csv=splits_csv, work_dir=run_dir / "rounds")
    round_0 = Path(records[0]["model_dir"])

    def control(epochs: int, from_teacher: bool) -> dict:
        control_dir = run_dir.parent / f"{base_name}-control-{epochs}-epochs{'-from-teacher' if from_teacher else ''}"
        if not (control_dir / CARD_FILE).exists():  # shared by the runs that differ only in the other arms
            train(params, params.teacher.arch, data_dir=data_dir, splits_csv=splits_csv, out_dir=control_dir,
                  epochs=epochs, run_name="labeled-only control", init_from=round_0 if from_teacher else None)
        return {"round": 0, "control": True, "val_miou": read_card(control_dir).extra["val_miou"],
                "epochs": epochs, "model_dir": str(control_dir), "best": False, "from_teacher": from_teacher}

    controls = []
    if len(records) > 1:
        student_steps = records[1]["epochs"] * (records[1]["train_images"] // params.train.batch_size)
        controls.append((math.ceil(student_steps / max(1, labeled // params.train.batch_size)),
                         params.teacher.student_init == "teacher"))
        for record in records[1:]:
            record["control_key"] = controls[0]
    if args.consistency:
        from_teacher = args.consistency_init == "teacher"
        epochs = args.consistency_epochs or (controls[0][0] if controls and from_teacher else params.teacher.epochs)
        consistency_dir = run_dir / (f"consistency-{args.consistency:g}-threshold-{args.consistency_threshold:g}"
                                     f"-{epochs}-epochs{'-from-teacher' if from_teacher else ''}")
        if not (consistency_dir / CARD_FILE).exists():
            online = params.model_copy(deep=True)
            online.train.consistency = online.train.consistency.model_copy(
                update={"weight": args.consistency, "threshold": args.consistency_threshold})
            train(online, params.teacher.arch, data_dir=data_dir, splits_csv=splits_csv, out_dir=consistency_dir,
                  epochs=epochs, run_name="consistency", init_from=round_0 if from_teacher else None)
        records.append({"round": 0, "consistency": True, "val_miou": read_card(consistency_dir).extra["val_miou"],
                        "epochs": epochs, "model_dir": str(consistency_dir), "best": False,
                        "from_teacher": from_teacher})
        if from_teacher or epochs != params.teacher.epochs:  # else round 0 is its control
            controls.append((epochs, from_teacher))
            records[-1]["control_key"] = controls[-1]
    records += [control(epochs, from_teacher) for epochs, from_teacher in dict.fromkeys(controls)]
    if args.oracle:
        # As long as the first student, fine-tuning round 0 when the students do; else round 0's steps from scratch.
        from_teacher = bool(controls) and controls[0][1]
        epochs = controls[0][0] if controls else params.teacher.epochs
        oracle_splits, oracle_images = oracle
        epochs = math.ceil(epochs * (labeled // params.train.batch_size) / (oracle_images // params.train.batch_size))
        # From scratch it does not depend on the fraction: one model serves them all.
        oracle_dir = run_dir.parent / (f"{base_name}-oracle-{epochs}-epochs-from-teacher" if from_teacher
                                       else f"{base_name.split('-fraction-')[0]}-oracle-{epochs}-epochs")
        if not (oracle_dir / CARD_FILE).exists():
            every_mask = params.model_copy(deep=True)
            every_mask.train.val_interval = max(1, VAL_STEPS // (oracle_images // params.train.batch_size))
            train(every_mask, params.teacher.arch, data_dir=data_dir, splits_csv=oracle_splits, out_dir=oracle_dir,
                  epochs=epochs, run_name="oracle", init_from=round_0 if from_teacher else None)
        records.append({"round": 0, "oracle": True, "val_miou": read_card(oracle_dir).extra["val_miou"],
                        "epochs": epochs, "model_dir": str(oracle_dir), "best": False, "from_teacher": from_teacher})
    rows = []
    for record in records:
        model_dir = Path(record["model_dir"])
        name = f"round_{record['round']}" if model_dir.name == "model" else model_dir.name
        metrics_file = run_dir / "metrics" / f"{name}.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else evaluate(
            params, name, model_dir=model_dir, data_dir=data_dir, splits_csv=splits_csv, metrics_file=metrics_file,
            out_dir=run_dir / "evaluation" / name, plots_dir=run_dir / "plots")
        arm = "pseudo-labeled" if record["round"] else "labeled-only"
        if record.get("consistency"):
            arm = CONSISTENCY_ARM + (", fine-tuning round 0" if record["from_teacher"] else "")
        if record.get("oracle"):
            arm = ORACLE_ARM + (", fine-tuning round 0" if record["from_teacher"] else "")
        if record.get("control"):
            arm = f"labeled-only, {record['epochs']} epochs" + (", fine-tuning round 0" if record["from_teacher"] else "")
        row = {
            "fraction": fraction, "labeled_images": labeled, "arm": arm, "round": record["round"],
            "test_miou": metrics["miou"], "val_miou": record["val_miou"], "epochs": record["epochs"],
            "coverage": record.get("coverage"), "pseudo_accuracy": record.get("pseudo_accuracy"),
            "prior_correction": record.get("prior_correction"),
            "kept": record["best"], "train_minutes": read_card(model_dir).extra["train_seconds"] / 60,
            "per_class_iou": metrics["per_class_iou"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    controls = {(r["epochs"], record["from_teacher"]): r for r, record in zip(rows, records) if record.get("control")}
    for row, record in zip(rows, records):
        if "control_key" in record:
            control = controls[record["control_key"]]
            row["control_test_miou"], row["control_per_class_iou"] = control["test_miou"], control["per_class_iou"]
    return rows


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def _blank(value) -> str:
    return "" if value is None else f"{value:g}"


def _markdown(setup: dict, rows: list[dict], table: list[dict]) -> str:
    lines = [
        "# Semi-supervised CamVid: labeled-only against pseudo-labeled and consistency-trained",
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
    lines += ["", "| labeled | labeled-only | labeled-only, chosen model's steps | semi-supervised (chosen by val) | gain | "
              "gain over the longer control | every mask (oracle) | training time (min) |", "|---|---|---|---|---|---|---|---|"]

    def pct(value, sign=""):
        return "" if value is None else f"{100 * value:{sign}.1f}"

    def chosen(summary):
        return f" ({summary['semi_supervised_arm']}, round {summary['semi_supervised_round']})" \
            if summary["semi_supervised_arm"] else ""

    for t in table:
        lines.append(f"| {t['fraction']:g} ({t['labeled_images']}) | {pct(t['labeled_only'])} | "
                     f"{pct(t['labeled_only_long'])} | {pct(t['semi_supervised'])}{chosen(t)} | "
                     f"{pct(t['gain'], '+')} | {pct(t['gain_over_long'], '+')} | {pct(t.get('oracle'))} | {t['minutes']:.0f} |")
    for t in table:
        arms = t["per_class_iou"]
        lines += ["", f"Per-class test IoU at {t['fraction']:g} labeled (semi-supervised: the model val chose):", "",
                  "| class | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
        for name in next(iter(arms.values())):
            lines.append(f"| {name} | " + " | ".join(pct(per_class[name]) for per_class in arms.values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
