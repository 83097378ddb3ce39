"""Wall time of the pipeline flow with ``orchestrate.slots: 2`` against ``slots: 1``, in the same run.

    python benchmarks/parallel_slots.py [--archs pspnet unet] [--epochs 4]

One project on the generated data is set up and its stages before the architectures' chains (synth to
pseudo_label) are run once; two copies of it then run the flow (``pipelines/training_pipeline.py``), one with one
slot and one with two, and the wall time of each from the flow's start to its end is compared: the
``train@ARCH`` -> ``evaluate@ARCH`` chains run side by side with two slots, the rest (evaluate_teacher,
leaderboard, register) in both as before. Each slot's stages get ``cores / slots`` threads; the one-slot run gets
as many, so both do the same arithmetic and end with the same weights (checked). Writes
``reports/parallel_slots.{json,md}``.
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
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def _env(project: Path, threads: int) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "OMP_NUM_THREADS": str(threads),
            "TQDM_DISABLE": "1"}


def make_project(root: Path, archs: list[str], epochs: int) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root)
    for folder in ("src", "pipelines"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update({"archs": archs, "epochs": epochs, "device": "cpu"})
    params["teacher"]["epochs"] = 1  # the shared prefix is not what is measured
    params["register"]["floor"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    for args in (["init", "-q"], ["config", "core.analytics", "false"]):
        subprocess.run([PYTHON, "-m", "dvc", *args], cwd=root, check=True)
    shutil.copytree(REPO / ".dvc/plots", root / ".dvc/plots")
    return root


def run_flow(project: Path, slots: int, threads: int) -> float:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["orchestrate"] = {"slots": slots}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.perf_counter()
    subprocess.run([PYTHON, "pipelines/training_pipeline.py", "."], cwd=project, env=_env(project, threads),
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["pspnet", "unet"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--work", type=Path, default=REPO / ".bench/parallel_slots")
    parser.add_argument("--out", type=Path, default=REPO / "reports/parallel_slots")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    threads = max(1, cores // 2)
    one = make_project(args.work / "one-slot", args.archs, args.epochs)
    subprocess.run([PYTHON, "-m", "dvc", "repro", "pseudo_label"], cwd=one, env=_env(one, cores), check=True,
                   stdout=subprocess.DEVNULL)
    two = args.work / "two-slots"
    shutil.rmtree(two, ignore_errors=True)
    shutil.copytree(one, two, symlinks=True)
    seconds = {1: run_flow(one, 1, threads), 2: run_flow(two, 2, threads)}
    same = all(
        all(a.equal(b) for a, b in zip(load_file(str(one / "models" / arch / "model.safetensors")).values(),
                                        load_file(str(two / "models" / arch / "model.safetensors")).values()))
        for arch in args.archs)
    report = {"archs": args.archs, "epochs": args.epochs, "cores": cores, "threads_per_stage": threads,
              "seconds": {"1 slot": seconds[1], "2 slots": seconds[2]}, "ratio": seconds[2] / seconds[1],
              "same_weights": same}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = (
        "# Two slots against one: the pipeline flow's wall time\n\n"
        f"`python benchmarks/parallel_slots.py --archs {' '.join(args.archs)} --epochs {args.epochs}`; "
        f"{cores} CPU cores, threads per stage: {threads} in both runs; the stages up to pseudo_label ran once "
        "before both.\n\n"
        "| slots | wall time (s) |\n|---|---|\n"
        f"| 1 | {seconds[1]:.0f} |\n| 2 | {seconds[2]:.0f} |\n\n"
        f"Ratio (2 slots / 1 slot): **{report['ratio']:.2f}**. Same weights in both: {same}.\n"
    )
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
