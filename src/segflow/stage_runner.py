"""Run a project's DVC stages several at a time, recorded in dvc.lock as ``dvc repro`` records them.

``dvc repro`` holds the workspace's lock for as long as it runs, so two stages cannot be reproduced at once.
The runner keeps DVC's bookkeeping and runs only the stages' commands side by side: under one lock DVC decides
whether a stage is stale and its outputs are removed (what ``dvc repro`` does before a command); the command,
the one dvc.yaml gives, runs outside the lock; then ``dvc commit`` records the stage's dependencies and outputs
in dvc.lock and the cache, under the lock again. A stage is asked whether it is stale only once everything it
depends on is recorded, so it reruns exactly when ``dvc repro`` would rerun it. Entries enter dvc.lock in the
order stages finish; :meth:`StageRunner.finish` puts them back in the order a sequential run writes them.

Run from the project's folder (the flow changes into it): DVC names and finds stages relative to the working
directory.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import yaml
from dvc.env import DVC_ROOT, DVC_STAGE
from dvc.repo import Repo
from dvc.utils.serialize import modify_yaml

LOCK_FILE = "dvc.lock"


@dataclass(frozen=True)
class PlannedStage:
    name: str                    # DVC's address: ``train@unet`` for a matrix stage
    upstream: tuple[str, ...]    # stages whose outputs it depends on


def plan(project: Path) -> list[PlannedStage]:
    """Every stage in dependency order (ties broken by name, the order a sequential run takes) with the
    stages it depends on."""
    with Repo(str(project)) as repo:
        graph = repo.index.graph  # DVC's edges point from a stage to what it depends on
        order = nx.lexicographical_topological_sort(graph.reverse(), key=lambda s: s.addressing)
        return [PlannedStage(stage.addressing, tuple(sorted(s.addressing for s in graph.successors(stage))))
                for stage in order]


def slot_environment(slot: int, slots: int, gpus: int, cpus: int | None = None) -> dict[str, str]:
    """Environment of a stage command in ``slot`` of ``slots``: its own GPU when there are any (slots beyond
    the GPUs share them round robin), else an equal share of the CPU threads."""
    if gpus:
        return {"CUDA_VISIBLE_DEVICES": str(slot % gpus)}
    threads = str(max(1, (cpus or os.cpu_count() or 1) // slots))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


class Slots:
    """``slots`` places to run a stage command; :meth:`take` waits for a free one and yields its environment."""

    def __init__(self, slots: int, gpus: int) -> None:
        self.count = slots
        self._gpus = gpus
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(slots):
            self._free.put(slot)

    @contextmanager
    def take(self) -> Iterator[dict[str, str]]:
        slot = self._free.get()
        try:
            yield slot_environment(slot, self.count, self._gpus)
        finally:
            self._free.put(slot)


class StageRunner:
    """DVC's side of running stages concurrently in ``project``; every DVC call goes through one lock."""

    def __init__(self, project: Path, order: list[str]) -> None:
        self.project = project
        # A sequential run updates the entries dvc.lock has in place and appends the others in stage order.
        self.order = [*dict.fromkeys([*_locked_stages(project / LOCK_FILE), *order])]
        self._lock = threading.Lock()

    def start(self, name: str) -> str | None:
        """None when DVC finds the stage up to date; else its outputs are removed (persistent ones kept, as
        ``dvc repro`` keeps them) and its command is returned."""
        with self._lock, Repo(str(self.project)) as repo:
            if not repo.status(targets=[name]):
                return None
            (stage,) = (s for s in repo.index.stages if s.addressing == name)
            with repo.lock:
                stage.remove_outs(ignore_remove=False, force=False)
            commands = stage.cmd if isinstance(stage.cmd, list) else [stage.cmd]
            return " && ".join(commands)

    def environment(self, name: str) -> dict[str, str]:
        """What DVC adds to a stage command's environment."""
        return {DVC_ROOT: str(self.project), DVC_STAGE: name}

    def commit(self, name: str) -> None:
        """Record the stage in dvc.lock and the cache (``dvc commit``)."""
        with self._lock, Repo(str(self.project)) as repo:
            repo.commit(name, force=True)

    def finish(self) -> None:
        """Put dvc.lock's entries in the order a sequential run leaves them: those there before the run where
        they were, then the new ones in stage order (DVC keeps the order of first insertion)."""
        path = self.project / LOCK_FILE
        with self._lock:
            if not path.exists():
                return
            with modify_yaml(str(path)) as data:
                stages = data.get("stages", {})
                ordered = {name: stages[name] for name in self.order if name in stages}
                ordered.update((name, entry) for name, entry in stages.items() if name not in ordered)
                data["stages"] = ordered


def _locked_stages(lock_file: Path) -> list[str]:
    if not lock_file.exists():
        return []
    return list((yaml.safe_load(lock_file.read_text()) or {}).get("stages", {}))
