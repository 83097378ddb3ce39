"""Early stopping on CamVid: does ``train.patience`` keep the fixed budget's test mIoU at a fraction of its steps?

    python benchmarks/early_stopping_camvid.py --seeds 0 1 [--patience 5] [--epochs 30] [--width 0.25]

U-Net (original) at ``--width`` on CamVid resized to 90x120 (prepared once, as benchmarks/camvid_leaderboard.py
prepares it: ``segflow ingest``, ``validate``, ``split``, ``cache``), trained by ``segflow train`` and scored by
``segflow evaluate`` exactly as ``dvc repro`` runs them, with params.yaml's defaults and the leaderboard's recipe,
for each seed twice: ``fixed`` (``--epochs`` epochs) and ``early`` (at most ``--epochs``, ``train.patience:
--patience``; the learning-rate schedule is the same, over ``--epochs``). Val chooses each run's epoch, test
reports. The bar: the early runs within 1 test mIoU point of the fixed ones (mean over the seeds) while training
at most 60 % of their optimizer steps. Writes ``reports/early_stopping_camvid.{json,md}``; finished runs are cached
in the work folder and not repeated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from camvid_leaderboard import prepare, train_and_evaluate  # noqa: E402 - the leaderboard's data and recipe

ARCH = "unet_original"
MAX_STEP_SHARE, MAX_LOSS = 0.6, 0.01


def run(prepared: Path, work: Path, arm: str, seed: int, args: argparse.Namespace) -> dict:
    """One training and its evaluation (cached): test and val mIoU, the epochs and steps it trained."""
    folder = work / f"{arm}-seed-{seed}"

    def budget(params: dict) -> None:
        params["train"].update({"archs": [ARCH], "epochs": args.epochs,
                                "patience": args.patience if arm == "early" else None})
        params["models"] = {ARCH: {"width": args.width}}

    scores_file = train_and_evaluate(prepared, folder, ARCH, "architecture", seed, budget)
    scores = json.loads(scores_file.read_text())
    history = json.loads((folder / "models" / ARCH / "history.json").read_text())
    end = scores.get("training_end") or {}
    return {"arm": arm, "seed": seed, "test_miou": scores["test"]["miou"], "val_miou": scores["val"]["miou"],
            "epochs": end.get("epoch", len(history)), "best_epoch": scores["best_epoch"],
            "train_minutes": scores["train_seconds"] / 60, "val_curve": [h.get("val_miou") for h in history]}


def summary(rows: list[dict], args: argparse.Namespace) -> dict:
    by = {(r["arm"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows if ("fixed", r["seed"]) in by and ("early", r["seed"]) in by})
    loss = [by["fixed", s]["test_miou"] - by["early", s]["test_miou"] for s in seeds]
    share = [by["early", s]["epochs"] / by["fixed", s]["epochs"] for s in seeds]  # epochs of equal steps each
    met = bool(seeds) and statistics.mean(loss) <= MAX_LOSS and max(share) <= MAX_STEP_SHARE
    return {"seeds": seeds, "test_loss_points": [round(100 * x, 2) for x in loss],
            "step_share": [round(x, 3) for x in share], "met": met,
            "bar": f"early within {100 * MAX_LOSS:.0f} test mIoU point of fixed (mean over seeds), "
                   f"at most {MAX_STEP_SHARE:.0%} of its steps (every seed)"}


def markdown(rows: list[dict], result: dict, args: argparse.Namespace) -> str:
    lines = ["# Early stopping on CamVid", "",
             f"`python benchmarks/early_stopping_camvid.py --seeds {' '.join(map(str, result['seeds']))} "
             f"--patience {args.patience} --epochs {args.epochs} --width {args.width}`: U-Net (original) at width "
             f"{args.width}, CamVid 90x120 (train 367 / val 101 / test 233), the leaderboard's recipe, batch 8, the "
             f"CPU. `fixed`: {args.epochs} epochs; `early`: at most {args.epochs}, `train.patience: {args.patience}` "
             "(val every epoch; the same poly schedule over the maximum). Val chooses, test reports.", "",
             "| arm | seed | test mIoU | val mIoU | epochs trained | best epoch | minutes |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["seed"], r["arm"] != "fixed")):
        lines.append(f"| {r['arm']} | {r['seed']} | {100 * r['test_miou']:.1f} | {100 * r['val_miou']:.1f} | "
                     f"{r['epochs']} | {r['best_epoch']} | {r['train_minutes']:.1f} |")
    lines += ["", f"Bar: {result['bar']}. Test mIoU lost by stopping early (points, per seed): "
                  f"{result['test_loss_points']}; share of the fixed run's steps: {result['step_share']}. "
                  f"**{'Met' if result['met'] else 'Not met'}.**", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--camvid", type=Path, default=REPO.parent / "shared/datasets/camvid")
    parser.add_argument("--work", type=Path, default=REPO / ".bench/early_stopping")
    parser.add_argument("--out", type=Path, default=REPO / "reports/early_stopping_camvid")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=["fixed", "early"], choices=["fixed", "early"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--report-only", action="store_true", help="write the report from the cached runs")
    args = parser.parse_args()
    work = args.work.resolve() / f"e{args.epochs}-p{args.patience}-w{args.width:g}"
    prepared = prepare(args.camvid.resolve(), args.work.resolve())
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            if args.report_only and not (work / f"{arm}-seed-{seed}" / "evaluation" / ARCH / "scores.json").exists():
                continue
            rows.append(run(prepared, work, arm, seed, args))
    result = summary(rows, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, **result}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, result, args))
    print(markdown(rows, result, args))


if __name__ == "__main__":
    main()
