"""GPU acceptance: every CUDA path of segflow in one command, one summary table with a pass or fail per check.

    python benchmarks/gpu_check.py                        # one GPU, under 8 minutes
    python benchmarks/gpu_check.py --device cpu --quick   # every check at a toy size on the CPU (CI: < 2 min)

Checks, each in its own processes (one failing check does not stop the others):

- throughput: benchmarks/train_throughput.py at 512x512 for the three models (Unet-ResNet34, DeepLabv3+-ResNet50,
  PSPNet-ResNet50): segflow's training step (bf16 autocast, channels-last, fused optimizer, batch augmentation on
  the device) against a plain fp32 loop, same model, data and optimizer. Passes when every ratio is at least 1.
  Quick: Unet-ResNet34 at 64x64 on the CPU, where the work is the same fp32: the ratio is reported, not judged.
- torchrun: ``torchrun --nproc_per_node N segflow train`` on a generated project, N = the GPUs (NCCL; with one
  GPU one process, and an NCCL all-reduce in a process group of one checks that NCCL initialises here).
  Quick: two CPU processes (gloo).
- compile: ``segflow train`` with ``train.compile: true``; passes when the model trained compiled, not when the
  one-warning eager fallback ran. Quick on the CPU: Dynamo is disabled (inductor builds C++ for minutes on two
  cores), so only the setting's path runs.
- pipeline: ``dvc repro`` of the default pipeline (dvc.yaml, params.yaml) in a copy of the repository, on CUDA;
  passes when it finishes and registers a model. Quick: a small generated dataset, one architecture, one epoch.

The table gives each check's seconds and its detail (throughput ratios, the devices used).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SEGFLOW = str(Path(sys.executable).parent / "segflow")


@dataclass
class Check:
    name: str
    passed: bool
    seconds: float
    detail: str


def run(command: list[str], cwd: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # dvc.yaml's `segflow`
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": path, **(env or {})})


def tail(process: subprocess.CompletedProcess) -> str:
    """The error lines of a failed command (torchrun puts its own report after the worker's)."""
    lines = [line for line in (process.stderr or process.stdout).strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"error|Error|Exception", line)]
    return " | ".join((errors or lines)[-3:])[-400:]


def project(root: Path, params: dict) -> Path:
    """A copy of the repository's pipeline (dvc.yaml, params.yaml merged with ``params``, src, pipelines) under
    git and DVC, as a user's clone is."""
    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root)
    merged = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in params.items():
        merged[section] = {**merged.get(section, {}), **values} if isinstance(values, dict) else values
    (root / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    for folder in ("src", "pipelines"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / ".dvc/plots", root / ".dvc/plots")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "-f"], cwd=root, check=True)
    return root


def prepared(work: Path, params: dict) -> Path:
    """A project with its data generated, ingested, split and cached (the stages before training), made once."""
    root = work / "prepared"
    if (root / "data/cache").exists():
        return root
    project(root, params)
    done = run([sys.executable, "-m", "dvc", "repro", "-q", "split", "cache"], root, timeout=600)  # and before
    if done.returncode != 0:
        raise RuntimeError(f"preparing the project failed: {tail(done)}")
    return root


def check_throughput(args: argparse.Namespace) -> Check:
    size, models = ("64", ["unet-resnet34"]) if args.quick else ("512", [
        "unet-resnet34", "deeplabv3plus-resnet50", "pspnet-resnet50"])
    steps = ["--steps", "4", "--warmup", "1"] if args.quick else ["--steps", "20"]
    started = time.perf_counter()
    done = run([sys.executable, str(REPO / "benchmarks/train_throughput.py"), "--device", args.device, "--size", size,
                "--models", *models, *steps], REPO, timeout=args.timeout)
    ratios = dict(re.findall(r"^([\w-]+): segflow .* ratio ([\d.]+)", done.stdout, re.M))
    # Quick on the CPU runs the code path and reports the ratio: a timing on two loaded cores is no verdict.
    floor = 0.0 if args.quick and args.device == "cpu" else 1.0
    passed = done.returncode == 0 and len(ratios) == len(models) and min(map(float, ratios.values())) >= floor
    detail = ", ".join(f"{name} {ratio}" for name, ratio in ratios.items()) or tail(done)
    return Check("throughput", passed, time.perf_counter() - started, f"segflow / fp32 loop at {size}²: {detail} "
                 + (f"(pass: each ≥ {floor})" if floor else "(reported, not judged: --quick on the CPU)"))


def _train_params(args: argparse.Namespace, **train: object) -> dict:
    size = 48 if args.quick else 128
    return {
        "synth": {"num_labeled": 24 if args.quick else 64, "num_unlabeled": 8, "image_size": size},
        "train": {"archs": ["unet"], "epochs": 1, "batch_size": 4, "crop_size": size, "device": args.device,
                  "use_pseudo_labels": False, **train},
        "register": {"floor": False},
    }


def check_torchrun(args: argparse.Namespace, work: Path) -> Check:
    started = time.perf_counter()
    gpus = _gpus() if args.device == "cuda" else 0
    processes = max(gpus, 1) if args.device == "cuda" else 2
    root = prepared(work, _train_params(args))
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                "--no-python", SEGFLOW, "train", "--arch", "unet"], root, timeout=args.timeout)
    passed = done.returncode == 0 and (root / "models/unet/model.safetensors").exists()
    detail = f"{processes} process(es), {'NCCL' if args.device == 'cuda' and processes > 1 else 'gloo' if processes > 1 else 'one'}"
    if args.device == "cuda" and processes == 1:  # segflow needs no process group with one GPU: check NCCL alone
        nccl = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                    str(Path(__file__).resolve()), "--nccl-probe"], REPO, timeout=120)
        passed = passed and nccl.returncode == 0
        detail += f"; NCCL all-reduce: {'ok' if nccl.returncode == 0 else tail(nccl)}"
    return Check("torchrun", passed, time.perf_counter() - started, detail if passed else f"{detail}: {tail(done)}")


def check_compile(args: argparse.Namespace, work: Path) -> Check:
    started = time.perf_counter()
    root = prepared(work, _train_params(args))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["compile"] = True
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # Quick on the CPU: Dynamo off (inductor's C++ build alone takes minutes on two cores); the setting's path runs.
    done = run([SEGFLOW, "train", "--arch", "unet"], root, timeout=args.timeout,
               env={"TORCHDYNAMO_DISABLE": "1"} if args.quick and args.device == "cpu" else None)
    fell_back = "eager" in done.stderr and "compile" in done.stderr.lower()
    trained = done.returncode == 0 and (root / "models/unet/model.safetensors").exists()
    passed = trained and (not fell_back or args.quick)
    detail = ("compiled" if not fell_back else "eager fallback (allowed in --quick)") if trained else tail(done)
    return Check("compile", passed, time.perf_counter() - started, detail)


def check_pipeline(args: argparse.Namespace, work: Path) -> Check:
    started = time.perf_counter()
    params = _train_params(args) if args.quick else {"train": {"device": args.device}}
    root = project(work / "pipeline", params)
    done = run([sys.executable, "-m", "dvc", "repro", "-q"], root, timeout=args.timeout)
    decision = root / "registry/decision.json"
    passed = done.returncode == 0 and decision.exists()
    if not passed:
        return Check("pipeline", False, time.perf_counter() - started, tail(done))
    chosen = json.loads(decision.read_text())
    return Check("pipeline", True, time.perf_counter() - started,
                 f"dvc repro on {args.device}: {chosen['candidate']} registered as version {chosen['version']}, "
                 f"test {chosen['metric'] if 'metric' in chosen else 'score'} {chosen['score']:.3f}, "
                 f"promoted: {chosen['promoted']} ({chosen['reason']})")


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def nccl_probe() -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    value = torch.ones(1, device="cuda")
    dist.all_reduce(value)
    assert value.item() == dist.get_world_size()
    dist.destroy_process_group()


def table(checks: list[Check]) -> str:
    lines = ["| check | result | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.seconds:.0f} | {c.detail} |" for c in checks]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy sizes (CI)")
    parser.add_argument("--checks", nargs="+", default=["throughput", "torchrun", "compile", "pipeline"],
                        choices=["throughput", "torchrun", "compile", "pipeline"])
    parser.add_argument("--timeout", type=float, default=300, help="seconds per check's command")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    parser.add_argument("--nccl-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nccl_probe:
        nccl_probe()
        return
    if args.device == "cuda" and _gpus() == 0:
        sys.exit("gpu_check: no CUDA device here; use --device cpu --quick for the CPU version.")
    started = time.perf_counter()
    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.checks:
            begun = time.perf_counter()
            try:
                checks.append(check_throughput(args) if name == "throughput"
                              else globals()[f"check_{name}"](args, Path(tmp)))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                checks.append(Check(name, False, time.perf_counter() - begun, str(exc)[-400:]))
            print(table(checks[-1:]).splitlines()[-1], flush=True)
    summary = table(checks) + f"\n\nTotal {time.perf_counter() - started:.0f} s, device {args.device}" \
        + (" (quick)" if args.quick else "") + ".\n"
    print(summary)
    if args.out:
        args.out.write_text(summary)
    sys.exit(0 if all(c.passed for c in checks) else 1)


if __name__ == "__main__":
    main()
