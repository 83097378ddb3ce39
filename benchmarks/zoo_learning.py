"""Which architectures learn on the embedded default data within the default budget?

    python benchmarks/zoo_learning.py [--epochs 3] [--seeds 0 1] [--no-prior-init] [ARCH ...]

Every registered architecture in the small configuration of the model-zoo tests (tests/models/zoo_testing.py:
ResNet-18 encoders, VGG networks at width 1/8, ...) is trained by the train stage's function with params.yaml's
defaults (its recipe, batch size, crops, epochs unless --epochs) on the default synthetic data (params.yaml's
``synth`` section: 128 labeled images of 96 pixels, split 3:1 into train and val), one seed. A model learns when
its best val mIoU, averaged over the seeds, beats predicting the majority class everywhere by more than 0.03.
``--no-prior-init`` is the control for ``train.prior_init`` (the output bias starting at zero). Writes
``reports/zoo_learning.{json,md}``: one column per (epochs, prior init) setting run so far; finished trainings are
cached in the work folder and not repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests/models"))
from zoo_testing import TINY  # noqa: E402 - the small configurations the zoo tests build

from segflow.config import Layout, load_params, parse_params  # noqa: E402
from train_testing import majority_val_miou, make_project, train_from_params  # noqa: E402 - as the tests make them

MARGIN = 0.03


def prepare(work: Path, defaults) -> tuple[Path, Path, float]:
    """The default synthetic data (params.yaml's synth), ingested, split 3:1 into train and val (once); the val
    majority class's mIoU."""
    synth = defaults.synth
    if not (work / Layout.splits).exists():
        train = synth.num_labeled * 3 // 4
        make_project(work, train, synth.num_labeled - train, synth.image_size)
    return work / Layout.ingested, work / Layout.splits, majority_val_miou(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", default=list(TINY))
    parser.add_argument("--epochs", type=int, default=None, help="default: params.yaml's train.epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--no-prior-init", dest="prior_init", action="store_false",
                        help="the control: train.prior_init false (output bias starts at zero)")
    parser.add_argument("--work", type=Path, default=REPO / ".bench/zoo_learning")
    parser.add_argument("--out", type=Path, default=REPO / "reports/zoo_learning")
    args = parser.parse_args()
    defaults = load_params(REPO / "params.yaml")
    epochs = args.epochs or defaults.train.epochs
    args.work.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    os.chdir(args.work)  # the embedded MLflow store of the trainings goes there
    data_dir, splits_csv, majority = prepare(args.work, defaults)
    setting = f"epochs_{epochs}" + ("" if args.prior_init else "_zero_bias")
    results_file = args.work / f"{setting}.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for seed in args.seeds:
        for arch in args.archs:
            key = f"{arch}@{seed}"
            if key in results:
                continue
            params = parse_params({"train": {"archs": [arch], "epochs": epochs, "seed": seed,
                                             "prior_init": args.prior_init, "crop_size": defaults.synth.image_size,
                                             "device": "cpu", "decoded_cache": False},
                                   "models": {arch: TINY[arch]}})
            started = time.perf_counter()
            run = train_from_params(params, arch, data_dir=data_dir, splits_csv=splits_csv,
                                    out_dir=args.work / setting / key)
            results[key] = {"arch": arch, "seed": seed, "options": TINY[arch], "best_val_miou": run.best_miou,
                            "history": [h["val_miou"] for h in run.history], "seconds": time.perf_counter() - started}
            results_file.write_text(json.dumps(results, indent=2))
            print(key, json.dumps(results[key]), flush=True)

    report = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").exists() else {}
    report.update({"majority_val_miou": majority, "margin": MARGIN, setting: results})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(report, defaults))
    print(_markdown(report, defaults))


def _title(setting: str) -> str:
    epochs = setting.split("_")[1]
    return f"{epochs} epochs" + (", zero bias" if setting.endswith("_zero_bias") else ", prior init")


def _markdown(report: dict, defaults) -> str:
    settings = sorted((key for key in report if key.startswith("epochs_")),
                      key=lambda k: (int(k.split("_")[1]), not k.endswith("_zero_bias")))
    steps = defaults.synth.num_labeled * 3 // 4 // defaults.train.batch_size
    threshold = report["majority_val_miou"] + report["margin"]
    lines = ["# Which architectures learn within the default budget", "",
             f"Default synthetic data ({defaults.synth.num_labeled} labeled images of {defaults.synth.image_size} px, "
             f"3:1 train/val), the zoo tests' small configurations, each architecture's recipe, batch "
             f"{defaults.train.batch_size} ({steps} steps an epoch). Best val mIoU, mean over the seeds [min, max]; "
             f"learns: the mean is above the majority class ({report['majority_val_miou']:.3f}) by more than "
             f"{report['margin']}. `prior init`: train.prior_init (the default), the output bias starts at the class "
             "prior; `zero bias`: the control. `python benchmarks/zoo_learning.py --epochs N [--no-prior-init]`.", "",
             "| model | options | " + " | ".join(_title(s) for s in settings) + " |",
             "|---|---|" + "---|" * len(settings)]
    names = sorted({row["arch"] for s in settings for row in report[s].values()})
    learns = dict.fromkeys(settings, 0)
    for name in names:
        cells, options = [], None
        for s in settings:
            runs = [row for row in report[s].values() if row["arch"] == name]
            if not runs:
                cells.append("")
                continue
            options = runs[0]["options"]
            scores = [row["best_val_miou"] for row in runs]
            mean = sum(scores) / len(scores)
            learns[s] += mean > threshold
            seeds = "/".join(str(row["seed"]) for row in runs)
            cells.append(f"{mean:.3f} [{min(scores):.3f}, {max(scores):.3f}] {'learns' if mean > threshold else '**no**'}"
                         f" (seeds {seeds})")
        lines.append(f"| {name} | {options} | " + " | ".join(cells) + " |")
    ran = {s: len({row["arch"] for row in report[s].values()}) for s in settings}
    lines.append("| **learn** | | " + " | ".join(f"{learns[s]} of {ran[s]}" for s in settings) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
