"""Which architectures learn on the embedded default data within the default budget?

    python benchmarks/zoo_learning.py [--epochs 3] [ARCH ...]

Every registered architecture in the small configuration of the model-zoo tests (tests/models/zoo_testing.py:
ResNet-18 encoders, VGG networks at width 1/8, ...) is trained by the train stage's function with params.yaml's
defaults (its recipe, batch size, crops, epochs unless --epochs) on the default synthetic data (params.yaml's
``synth`` section: 128 labeled images of 96 pixels, split 3:1 into train and val), one seed. A model learns when
its best val mIoU beats predicting the majority class everywhere by more than 0.03. Writes
``reports/zoo_learning.{json,md}`` (one run per --epochs value is kept in the JSON; finished rows are cached in
the work folder and not repeated).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests/models"))
from zoo_testing import TINY  # noqa: E402 - the small configurations the zoo tests build

from segflow.config import load_params, parse_params  # noqa: E402
from segflow.evaluate import majority_baseline  # noqa: E402
from segflow.imageio import read_mask  # noqa: E402
from segflow.ingest import ingest_coco  # noqa: E402
from segflow.synth import generate  # noqa: E402
from train_testing import train_from_params  # noqa: E402 - the train stage's call, as the tests make it

MARGIN = 0.03


def prepare(work: Path, defaults) -> tuple[Path, Path, float]:
    """The default synthetic data, ingested, with a 3:1 train/val split; the val majority class's mIoU."""
    cfg = defaults.synth
    if not (work / "splits.csv").exists():
        generate(work / "synthetic", seed=cfg.seed, num_labeled=cfg.num_labeled, num_unlabeled=0,
                 image_size=cfg.image_size)
        ingest_coco(work / "synthetic/images", work / "synthetic/annotations.json", work / "ingested")
        ids = sorted(p.stem for p in (work / "ingested/masks").glob("*.png"))
        splits = ["train" if i < len(ids) * 3 // 4 else "val" for i in range(len(ids))]
        (work / "splits.csv").write_text("image_id,split\n" + "".join(f"{i},{s}\n" for i, s in zip(ids, splits)))
    rows = [line.split(",") for line in (work / "splits.csv").read_text().split()[1:]]
    val = np.concatenate([read_mask(work / "ingested/masks" / f"{i}.png").ravel() for i, s in rows if s == "val"])
    counts = np.bincount(val[val != 255])
    return work / "ingested", work / "splits.csv", majority_baseline(np.diag(counts), [str(c) for c in range(len(counts))])["miou"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", default=list(TINY))
    parser.add_argument("--epochs", type=int, default=None, help="default: params.yaml's train.epochs")
    parser.add_argument("--work", type=Path, default=REPO / ".bench/zoo_learning")
    parser.add_argument("--out", type=Path, default=REPO / "reports/zoo_learning")
    args = parser.parse_args()
    defaults = load_params(REPO / "params.yaml")
    epochs = args.epochs or defaults.train.epochs
    args.work.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    os.chdir(args.work)  # the embedded MLflow store of the trainings goes there
    data_dir, splits_csv, majority = prepare(args.work, defaults)
    results_file = args.work / f"epochs-{epochs}.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for arch in args.archs:
        if arch in results:
            continue
        params = parse_params({"train": {"archs": [arch], "epochs": epochs, "crop_size": defaults.synth.image_size,
                                         "device": "cpu", "decoded_cache": False},
                               "models": {arch: TINY[arch]}})
        started = time.perf_counter()
        run = train_from_params(params, arch, data_dir=data_dir, splits_csv=splits_csv,
                                out_dir=args.work / f"epochs-{epochs}" / arch)
        results[arch] = {"options": TINY[arch], "best_val_miou": run.best_miou,
                         "history": [h["val_miou"] for h in run.history], "seconds": time.perf_counter() - started}
        results_file.write_text(json.dumps(results, indent=2))
        print(arch, json.dumps(results[arch]), flush=True)

    report = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").exists() else {}
    report.update({"majority_val_miou": majority, "margin": MARGIN, f"epochs_{epochs}": results})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(report, defaults))
    print(_markdown(report, defaults))


def _markdown(report: dict, defaults) -> str:
    budgets = sorted(int(key.split("_")[1]) for key in report if key.startswith("epochs_"))
    steps = defaults.synth.num_labeled * 3 // 4 // defaults.train.batch_size
    lines = ["# Which architectures learn within the default budget", "",
             f"Default synthetic data ({defaults.synth.num_labeled} labeled images of {defaults.synth.image_size} px, "
             f"3:1 train/val), the zoo tests' small configurations, each architecture's recipe, batch "
             f"{defaults.train.batch_size} ({steps} steps an epoch), one seed. Best val mIoU; learns: above the "
             f"majority class ({report['majority_val_miou']:.3f}) by more than {report['margin']}. "
             "`python benchmarks/zoo_learning.py --epochs N`.", "",
             "| model | options | " + " | ".join(f"{e} epochs" for e in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    names = sorted({name for e in budgets for name in report[f"epochs_{e}"]})
    threshold = report["majority_val_miou"] + report["margin"]
    for name in names:
        cells = []
        for e in budgets:
            row = report[f"epochs_{e}"].get(name)
            cells.append("" if row is None else
                         f"{row['best_val_miou']:.3f} {'learns' if row['best_val_miou'] > threshold else '**no**'}")
        options = next(report[f"epochs_{e}"][name]["options"] for e in budgets if name in report[f"epochs_{e}"])
        lines.append(f"| {name} | {options} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
