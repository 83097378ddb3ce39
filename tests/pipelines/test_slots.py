"""``orchestrate.slots: 2``: the flow trains and evaluates two architectures at the same time, DVC's record is
complete, and a training run beside another is the one `dvc repro` runs alone (benchmarks/parallel_slots.py
measures the wall time)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from pipeline_testing import TINY, dvc, load_flow_module, make_project, merge, mlflow_at

from segflow.orchestration import stage_runner
from train_testing import weights

pytestmark = pytest.mark.slow

# Two small architectures, one epoch each (the teacher's too, once: no unlabeled images): the test is about the
# orchestration.
ARCHS = ["segnet_basic", "unet_original"]
ALONE = "unet_original"  # trained alone too, the reference the one trained beside the other must equal to the bit
PARAMS = merge(copy.deepcopy(TINY), {"synth": {"num_unlabeled": 0},
                                     "train": {"archs": ARCHS, "epochs": 1}, "teacher": {"epochs": 1, "warm_start": False},
                                     "models": {"segnet_basic": {"width": 0.25}, "unet_original": {"width": 0.125}}})


def _run_flow(project: Path, project_root: Path, monkeypatch, slots: int) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["orchestrate"] = {"slots": slots}
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(project)  # the flow works in the project's folder
    with mlflow_at(f"sqlite:///{project / 'mlflow.db'}"):
        load_flow_module(project_root, "training_pipeline").segflow_pipeline(str(project))


def _lock_without_hashes(project: Path) -> dict:
    """dvc.lock's stages with their commands, params and the paths of their deps and outs (the hashes of what a
    training writes differ between any two runs: run ids, durations)."""
    stages = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {name: (entry["cmd"], entry.get("params"), [d["path"] for d in entry.get("deps", [])],
                   [o["path"] for o in entry.get("outs", [])]) for name, entry in stages.items()}


def _record_slot_intervals(monkeypatch) -> list[tuple[float, float]]:
    """Each stage command's time in its slot, as the flow's tasks take and give back the slots."""
    intervals = []
    take = stage_runner.Slots.take

    @contextmanager
    def recording(self):
        with take(self) as environment:
            start = time.monotonic()
            try:
                yield environment
            finally:
                intervals.append((start, time.monotonic()))

    monkeypatch.setattr(stage_runner.Slots, "take", recording)
    return intervals


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted((time, step) for start, end in intervals for time, step in ((start, 1), (end, -1)))
    running = most = 0
    for _, step in events:  # an end sorts before a start at the same millisecond
        running += step
        most = max(most, running)
    return most


def test_two_slots_train_two_architectures_at_once_and_record_what_a_sequential_run_records(
        tmp_path, project_root, monkeypatch):
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # `segflow`
    (tmp_path / "sequential").mkdir()
    sequential = make_project(tmp_path / "sequential", project_root, PARAMS)
    dvc(sequential, "repro", "pseudo_label")  # the stages before the architectures' chains, once for both
    parallel = tmp_path / "parallel"
    shutil.copytree(sequential, parallel, symlinks=True)
    recorded_before = list(_lock_without_hashes(parallel))
    # The thread count of a slot, for the sequential run too: the same threads, the same floating-point sums.
    monkeypatch.setenv("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // 2)))

    in_slots = _record_slot_intervals(monkeypatch)
    _run_flow(parallel, project_root, monkeypatch, slots=2)
    with mlflow_at(f"sqlite:///{sequential / 'mlflow.db'}"):  # a training as `dvc repro` runs it, alone
        dvc(sequential, "repro", f"train@{ALONE}")

    assert json.loads(dvc(parallel, "status", "--json").stdout) == {}  # `dvc repro` has nothing to do
    recorded, reference = _lock_without_hashes(parallel), _lock_without_hashes(sequential)
    assert set(recorded) == set(yaml.safe_load((parallel / "dvc.yaml").read_text())["stages"]) - {"train", "evaluate"} \
        | {f"{stage}@{arch}" for stage in ("train", "evaluate") for arch in ARCHS}
    assert {name: recorded[name] for name in reference} == reference
    # In the order a sequential run leaves: the entries there before where they were, then the new ones in plan order.
    added = [name for name in recorded if name not in recorded_before]
    assert list(recorded)[:len(recorded_before)] == recorded_before
    assert added == [stage.name for stage in stage_runner.plan(parallel) if stage.name in added]
    parallel_weights, sequential_weights = weights(parallel / "models" / ALONE), weights(sequential / "models" / ALONE)
    assert parallel_weights.keys() == sequential_weights.keys()
    assert all(parallel_weights[k].equal(sequential_weights[k]) for k in parallel_weights)
    # The independent stages (two trainings, the teacher's evaluation, then two evaluations) ran two at a time;
    # every stage the parallel run reran went through a slot.
    assert _most_at_once(in_slots) == 2
    assert len(in_slots) == 7  # the teacher's evaluation, 2 x (train, evaluate), leaderboard, register
