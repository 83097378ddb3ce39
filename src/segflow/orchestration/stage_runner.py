"""Run a project's DVC stages several at a time, recorded in dvc.lock as ``dvc repro`` records them.

``dvc repro`` holds the workspace's lock for as long as it runs, so two stages cannot be reproduced at once.
The runner keeps DVC's bookkeeping and runs only the stages' commands side by side: under one lock DVC decides
whether a stage is stale and its outputs are removed (what ``dvc repro`` does before a command); the command,
the one dvc.yaml gives, runs outside the lock; then ``dvc commit`` records the stage's dependencies and outputs
in dvc.lock and the cache, under the lock again. A stage is asked whether it is stale only once everything it
depends on is recorded, so it reruns exactly when ``dvc repro`` would rerun it. Entries enter dvc.lock in the
order stages finish; :meth:`StageRunner.finish` puts them back in the order a sequential run writes them.

For ``orchestrate.work_pool``, an architecture's chain runs in a workspace of its own on another machine
(:func:`prepare_workspace`) and comes back through DVC's remote and run cache (:func:`restore`).

Run from the project's folder (the flow changes into it): DVC names and finds stages relative to the working
directory.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import chdir, contextmanager
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import yaml
from dvc.env import DVC_ROOT, DVC_STAGE
from dvc.repo import Repo
from dvc.utils.serialize import modify_yaml

from segflow.config import parse_params
from segflow.errors import SegflowError, shown

LOCK_FILE = "dvc.lock"


@dataclass(frozen=True)
class PlannedStage:
    name: str                    # DVC's address: ``train@unet`` for a matrix stage
    upstream: tuple[str, ...]    # stages whose outputs it depends on


def plan(project: Path) -> list[PlannedStage]:
    """Every stage in dependency order (ties broken by name, the order a sequential run takes) with the
    stages it depends on; a stage that is no other's input and has none (``synth`` when params.yaml's ``data``
    points at the user's own data: nothing reads its output) is left out."""
    with Repo(str(project)) as repo:
        graph = repo.index.graph  # DVC's edges point from a stage to what it depends on
        order = nx.lexicographical_topological_sort(graph.reverse(), key=lambda s: s.addressing)
        return [PlannedStage(stage.addressing, tuple(sorted(s.addressing for s in graph.successors(stage))))
                for stage in order if graph.degree(stage) > 0 or len(graph) == 1]


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
            stage = _stage(repo, name)
            with repo.lock:
                stage.remove_outs(ignore_remove=False, force=False)
            return _shell_command(stage)

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


# Chains on a work pool: each runs in a workspace of its own and comes back through DVC's remote and run cache.


def chain_stages(arch: str) -> list[str]:
    """The stages of one architecture's chain (dvc.yaml's matrix stages), in order."""
    return [f"train@{arch}", f"evaluate@{arch}"]


def split_plan(planned: list[PlannedStage], chained: set[str]) -> tuple[list[str], list[str]]:
    """The stages before the chains (none of their upstream is chained) and the ones after them, in plan order,
    the chained stages left out."""
    downstream: set[str] = set()
    for stage in planned:  # dependency order: a stage's upstream come first
        if any(name in chained or name in downstream for name in stage.upstream):
            downstream.add(stage.name)
    before = [s.name for s in planned if s.name not in chained and s.name not in downstream]
    after = [s.name for s in planned if s.name in downstream and s.name not in chained]
    return before, after


def stale(project: Path, names: list[str]) -> bool:
    """Whether ``dvc repro`` would run any of the stages ``names`` (their upstream up to date)."""
    with Repo(str(project)) as repo:
        return bool(repo.status(targets=names))


# What a chain's workspace needs from the parent: the pipeline, its parameters and DVC's record of it.
WORKSPACE_FILES = ("dvc.yaml", LOCK_FILE, "params.yaml")
DVC_CONFIG_FILES = (".dvc/config", ".dvc/config.local")


def workspace_files(project: Path, stages: list[str]) -> dict[str, str]:
    """What a workspace for ``stages`` starts from: ``project``'s pipeline files, and the stages' inputs that DVC
    does not cache (outputs with ``cache: false``, such as metrics, are versioned with the pipeline, not pushed)."""
    names = [name for name in WORKSPACE_FILES if (project / name).exists()]
    with Repo(str(project)) as repo:
        index = repo.index
        uncached = {str(out.fs_path) for s in index.stages for out in s.outs if not out.use_cache}
        names += sorted({str(Path(dep.fs_path).relative_to(project)) for s in index.stages if s.addressing in stages
                         for dep in s.deps if str(dep.fs_path) in uncached})
    return {name: (project / name).read_text() for name in names}


def check_sent_files(source: Path, files: dict[str, str], stages: list[str]) -> None:
    """A worker trusts nothing it is sent (whoever can start a flow run chooses the parameters): ``files`` may
    name only what :func:`workspace_files` of its own checkout ``source`` names (no other path, so none outside
    the workspace); the pipeline (dvc.yaml: the commands run) must be the checkout's own, so it runs the
    project's commands at the project's version; params.yaml must parse (its architecture names become commands)."""
    expected = workspace_files(source, stages)
    if unknown := sorted(set(files) - set(expected)):
        raise SegflowError(f"the chain of {', '.join(stages)} was sent files it does not take: {shown(unknown)} "
                           f"(a workspace takes {', '.join(sorted(expected))}); refused, nothing written.")
    if "dvc.yaml" in files and files["dvc.yaml"] != expected.get("dvc.yaml"):
        raise SegflowError(f"the dvc.yaml sent for {', '.join(stages)} is not this worker's ({source / 'dvc.yaml'}): "
                           "the parent runs another version of the project, or the parameters were forged. Deploy "
                           "the parent's commit to the workers; nothing was run.")
    if "params.yaml" in files:
        try:
            parse_params(yaml.safe_load(files["params.yaml"]), "params.yaml sent to the worker")
        except yaml.YAMLError as exc:
            raise SegflowError(f"params.yaml sent to the worker: not valid YAML ({shown(str(exc))}).") from None


CHAIN_ENV = ("MLFLOW_TRACKING_URI", "SEGFLOW_PARENT_RUN_ID")  # what a chain's stages may be given by the parent
RUN_ID = re.compile(r"[0-9a-f]{32}")


def check_sent_env(env: dict[str, str]) -> None:
    """The environment a chain was sent for its stages: only the tracking server and the parent run, the run an
    MLflow run id, and the server this worker's own (where it has one: its credentials go there)."""
    if unknown := sorted(set(env) - set(CHAIN_ENV)):
        raise SegflowError(f"a chain was sent environment variables it does not take: {shown(unknown)} (it takes "
                           f"{', '.join(CHAIN_ENV)}); refused, nothing run.")
    if not RUN_ID.fullmatch(env.get("SEGFLOW_PARENT_RUN_ID", "0" * 32)):
        raise SegflowError(f"a chain was sent SEGFLOW_PARENT_RUN_ID {shown(env['SEGFLOW_PARENT_RUN_ID'])}, not an "
                           "MLflow run id; refused, nothing run.")
    own = os.environ.get("MLFLOW_TRACKING_URI")
    if own and env.get("MLFLOW_TRACKING_URI", own) != own:
        raise SegflowError(f"a chain was sent MLFLOW_TRACKING_URI {shown(env['MLFLOW_TRACKING_URI'])}, not this "
                           f"worker's tracking server {own}, where its credentials go; refused, nothing run.")


def prepare_workspace(source: Path, workspace: Path, files: dict[str, str], stages: list[str]) -> list[str]:
    """A DVC project in ``workspace`` that can reproduce ``stages``: ``files`` (see :func:`workspace_files`, and
    checked by :func:`check_sent_files`), ``source``'s DVC configuration (the remote), and the stages'
    dependencies that no stage writes (the code) copied from ``source``. Returns the stages the chain depends on,
    directly or not, to pull from the remote."""
    check_sent_files(source, files, stages)
    for name, text in files.items():
        (workspace / name).parent.mkdir(parents=True, exist_ok=True)
        (workspace / name).write_text(text)
    _cache_every_output(workspace / "dvc.yaml", {name.split("@")[0] for name in stages})
    Repo.init(str(workspace), no_scm=True)
    for name in DVC_CONFIG_FILES:
        if (source / name).exists():
            (workspace / name).write_text((source / name).read_text())
    _set_no_scm(workspace)
    with chdir(workspace), Repo(str(workspace)) as repo:  # stage names are relative to the cwd
        index = repo.index  # one index: each access builds new stage objects, which its graph does not know
        chain = [s for s in index.stages if s.addressing in stages]
        # Every stage the chain depends on, directly or not: a stage may read more than its outputs (the training
        # opens the images that ingest's manifest names, in the data root).
        upstream = sorted({u.addressing for s in chain for u in nx.descendants(index.graph, s)} - set(stages))
        written = {str(out.fs_path) for s in index.stages for out in s.outs}
        for stage in chain:
            for dep in stage.deps:
                if dep.protocol != "local" or str(dep.fs_path) in written:
                    continue
                relative = Path(dep.fs_path).relative_to(workspace)
                _copy(source / relative, workspace / relative)
    return upstream


def _cache_every_output(dvc_yaml: Path, definitions: set[str]) -> None:
    """``cache: false`` dropped from the outputs of the stage ``definitions``: the run cache records such outputs,
    but ``dvc push`` sends only cached ones, and the parent restores every output. The run's key (command,
    dependencies, parameters, output paths) does not change."""
    pipeline = yaml.safe_load(dvc_yaml.read_text())
    for name in definitions:
        stage = pipeline["stages"][name]
        for section in ("outs", "metrics", "plots"):
            if section in stage:
                stage[section] = [{path: {**(options or {}), "cache": True} for path, options in entry.items()}
                                  if isinstance(entry, dict) else entry for entry in stage[section]]
    dvc_yaml.write_text(yaml.safe_dump(pipeline, sort_keys=False))


def _set_no_scm(workspace: Path) -> None:
    """The workspace is no git repository (DVC's own config reader would refuse to open it to say so)."""
    from configobj import ConfigObj

    config = ConfigObj(str(workspace / DVC_CONFIG_FILES[0]))
    config.setdefault("core", {})["no_scm"] = "true"
    config.write()


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy2(source, target)


def restore(project: Path, names: list[str]) -> None:
    """Record the stages ``names``, in order, from runs of them that a chain's workspace pushed to DVC's default
    remote: outputs checked out from the run cache and dvc.lock entries written, as ``dvc repro`` restores a cached
    stage. Raises :class:`RunNotFound` when the remote holds no run of one with these dependencies."""
    from dvc.stage.cache import RunCacheNotFoundError

    with Repo(str(project)) as repo:
        repo.stage_cache.pull(None)  # the run records (small files); restore fetches the outputs it needs
        for name in names:
            stage = _stage(repo, name)
            try:
                with repo.lock:
                    repo.stage_cache.restore(stage, pull=True)
            except RunCacheNotFoundError:
                raise RunNotFound(f"DVC's default remote has no run of stage {name} with this workspace's "
                                  "dependencies and parameters") from None
            repo.commit(name, force=True)


class RunNotFound(RuntimeError):
    """No run of the stage with the workspace's dependencies and parameters is in the remote's run cache."""


def command(project: Path, name: str) -> str:
    """The shell command dvc.yaml gives stage ``name``."""
    with Repo(str(project)) as repo:
        return _shell_command(_stage(repo, name))


def _stage(repo: Repo, name: str):
    (stage,) = (s for s in repo.index.stages if s.addressing == name)
    return stage


def _shell_command(stage) -> str:
    return " && ".join(stage.cmd if isinstance(stage.cmd, list) else [stage.cmd])


def default_remote(project: Path) -> str | None:
    """DVC's default remote of ``project``, if it has one."""
    with Repo(str(project)) as repo:
        return repo.config["core"].get("remote")
