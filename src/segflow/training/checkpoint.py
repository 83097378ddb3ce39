"""Exact-resume training checkpoints: tensors in safetensors, everything else in a small JSON, never a pickle.

A checkpoint lives in a folder beside the model folder it will become (``models/.NAME.resume`` for
``models/NAME``): the final model folder is only written, whole, when training ends. The folder holds

* ``tensors-E-S.safetensors``: model weights and buffers (``model.*``), optimizer state tensors
  (``optimizer.<param>.<key>``) and, per process, the running loss of the epoch and every RNG state as
  uint8 tensors (``rank<r>.loss_sum``, ``rank<r>.{torch,cuda,numpy,python}``);
* ``checkpoint.json``: the progress (epoch, batches done in it, best score, history, MLflow run id), the
  optimizer's param groups, the LR scheduler and GradScaler state, and the name of its tensors file. Writing
  it (tmp file + rename) is the commit point: a kill before leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from segflow.data.fingerprint import differences
from segflow.errors import SegflowError
from segflow.fsutil import atomic_write_json
from segflow.training import distributed
from segflow.training.distributed import ProcessGroup
from segflow.training.plan import EpochPlan, Progress

CHECKPOINT_FILE = "checkpoint.json"


LOCKS_DIR = Path(".segflow/locks")  # in the project folder, outside every DVC-tracked output


def lock_path_for(out_dir: Path) -> Path:
    """The lock one training of ``out_dir`` holds: outside ``models/``, which the register stage depends on (a
    lock file there, left by any training attempt, would make ``dvc status`` report that stage changed). Named
    by the model folder's absolute path, so two projects' trainings never share one."""
    resolved = str(Path(out_dir).resolve())
    return LOCKS_DIR / f"{Path(out_dir).name}-{hashlib.sha256(resolved.encode()).hexdigest()[:16]}.lock"


def resume_dir_for(out_dir: Path) -> Path:
    """Where the resume state of ``out_dir`` lives: a hidden sibling, outside the atomically replaced folder."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.resume"


@dataclass
class Checkpoint:
    progress: Progress
    settings: dict[str, Any]   # what must not change between the run and its resumption
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]      # optimizer param groups and non-tensor state, scheduler, scaler


# --- RNG states as uint8 tensors -------------------------------------------------------------------------


def _bytes(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).copy())


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states (fixed sizes, so ranks can gather them)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.cat([_bytes(keys), _bytes(np.array([position, has_gauss], np.int64)),
                            _bytes(np.array([cached_gaussian], np.float64))]),
        "python": torch.cat([_bytes(np.array([version], np.int64)), _bytes(np.array(internal, np.uint32)),
                             _bytes(np.array([np.nan if gauss_next is None else gauss_next], np.float64))]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    raw = state["numpy"].numpy()
    keys, (position, has_gauss), (cached,) = raw[:2496].view(np.uint32), raw[2496:2512].view(np.int64), raw[2512:].view(np.float64)
    np.random.set_state(("MT19937", keys, int(position), int(has_gauss), float(cached)))
    raw = state["python"].numpy()
    version, internal, gauss_next = raw[:8].view(np.int64)[0], raw[8:-8].view(np.uint32), raw[-8:].view(np.float64)[0]
    random.setstate((int(version), tuple(int(x) for x in internal), None if np.isnan(gauss_next) else float(gauss_next)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def of_rank(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The tensors saved for one process (``rank<r>.<name>``, see segflow.training.distributed.gather_tensors)."""
    prefix = f"rank{rank}."
    return {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}


# --- optimizer state: tensors and the rest apart --------------------------------------------------------


def _split_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                other.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": other}


def _join_optimizer(tensors: dict[str, torch.Tensor], saved: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in saved["state"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": saved["param_groups"]}


# --- save / load ----------------------------------------------------------------------------------------


def save(
    resume_dir: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    progress: Progress,
    settings: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    ema: torch.nn.Module | None = None,
) -> None:
    """Write a checkpoint; ``tensors`` adds the per-process tensors (RNG states, running loss), ``ema`` the
    Mean Teacher's weights (segflow.training.ema)."""
    resume_dir.mkdir(parents=True, exist_ok=True)
    optimizer_tensors, optimizer_state = _split_optimizer(optimizer.state_dict())
    all_tensors = {
        **{f"model.{name}": value for name, value in model.state_dict().items()},
        **({} if ema is None else {f"ema.{name}": value for name, value in ema.state_dict().items()}),
        **optimizer_tensors,
        **tensors,
    }
    name = f"tensors-{progress.epoch}-{progress.batches_done}.safetensors"
    tmp = resume_dir / f".{name}.tmp"
    save_file({key: value.detach().cpu().contiguous() for key, value in all_tensors.items()}, str(tmp))
    tmp.replace(resume_dir / name)
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}  # functions: rebuilt
    atomic_write_json(resume_dir / CHECKPOINT_FILE, {
        "tensors": name, "progress": asdict(progress), "settings": settings,
        "optimizer": optimizer_state, "scheduler": scheduler_state, "scaler": scaler.state_dict(),
    })
    for stale in resume_dir.glob("tensors-*.safetensors"):
        if stale.name != name:
            stale.unlink()


def load(resume_dir: Path) -> Checkpoint:
    path = Path(resume_dir) / CHECKPOINT_FILE
    if not path.exists():
        raise SegflowError(
            f"{path}: no checkpoint to resume from. A training run writes one each epoch (and every "
            "train.checkpoint_every_steps steps) and removes it when it finishes; run without --resume to start over."
        )
    try:
        saved = json.loads(path.read_text())
        tensors = load_file(str(path.parent / saved["tensors"]))
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise SegflowError(f"{path}: unreadable checkpoint ({exc}); run without --resume to start over.") from None
    state = {key: saved[key] for key in ("optimizer", "scheduler", "scaler")}
    return Checkpoint(Progress(**saved["progress"]), saved["settings"], tensors, state)


def check_settings(checkpoint: Checkpoint, settings: dict[str, Any], resume_dir: Path) -> None:
    """Resuming under other settings would not continue the same run: name what changed."""
    saved = json.loads(json.dumps(checkpoint.settings))
    now = json.loads(json.dumps(settings))
    changed = sorted(key for key in saved.keys() | now.keys() if saved.get(key) != now.get(key))
    if changed:
        details = "; ".join(_change(key, saved.get(key), now.get(key)) for key in changed)
        raise SegflowError(
            f"{resume_dir / CHECKPOINT_FILE}: the checkpoint was written under other settings ({details}). "
            "Restore them to resume, or run without --resume to start over."
        )


def _change(key: str, then: Any, now: Any) -> str:
    if isinstance(then, dict) and isinstance(now, dict) and key.endswith("(SHA-256 of each file)"):
        return f"{key.removesuffix(' (SHA-256 of each file)')}: {differences(then, now)}"
    return f"{key}: {then!r} then, {now!r} now"


def restore(
    checkpoint: Checkpoint,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    rank: int = 0,
    ema: torch.nn.Module | None = None,
) -> None:
    """Load model, optimizer, scheduler, scaler and Mean Teacher state and this rank's RNG states."""
    tensors = checkpoint.tensors
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k.removeprefix("ema."): v for k, v in tensors.items() if k.startswith("ema.")})
    optimizer.load_state_dict(_join_optimizer(tensors, checkpoint.state["optimizer"]))
    scheduler.load_state_dict({**scheduler.state_dict(), **checkpoint.state["scheduler"]})
    if checkpoint.state["scaler"]:
        scaler.load_state_dict(checkpoint.state["scaler"])
    set_rng_state(of_rank(tensors, rank))


def remove(resume_dir: Path) -> None:
    shutil.rmtree(resume_dir, ignore_errors=True)


BEST_DIR = "best"  # inside the resume folder: the best weights so far survive a kill


class Checkpointer:
    """Exact resume: restores a training's state and writes it when due (rank 0; every rank hands over its RNG
    states and running loss)."""

    def __init__(self, resume_dir: Path, group: ProcessGroup, settings: dict[str, Any], plan: EpochPlan,
                 every_steps: int | None, **state: Any):
        self.resume_dir, self.group, self.settings = resume_dir, group, settings
        self.plan, self.every_steps = plan, every_steps or 0
        self.state = state  # model, optimizer, scheduler, scaler, ema
        self.started = time.perf_counter()

    def begin(self, resume: bool) -> tuple[Progress, torch.Tensor]:
        """The progress and this rank's running loss to go on from: the checkpoint's with ``resume`` (refused
        under other settings), else fresh ones, any old checkpoint removed."""
        device = self.group.device
        if resume:
            saved = load(self.resume_dir)
            check_settings(saved, self.settings, self.resume_dir)
            restore(saved, rank=self.group.rank, **self.state)
            progress = saved.progress
            loss_sum = of_rank(saved.tensors, self.group.rank)["loss_sum"].to(device)
        else:
            progress, loss_sum = Progress(), torch.zeros((), device=device)
            if self.group.is_main:
                remove(self.resume_dir)
        self.started = time.perf_counter() - progress.seconds
        return progress, loss_sum

    def elapsed(self) -> float:
        """Seconds of training, those before a resume included."""
        return time.perf_counter() - self.started

    def due(self, progress: Progress) -> bool:
        """Whether to checkpoint where ``progress`` stands: at the start of the epoch after a validated one (a
        resumed run replays the epochs since, exactly: the checkpoint holds the RNG states), and inside an
        epoch after every ``train.checkpoint_every_steps``-th optimizer step."""
        if progress.batches_done == 0:
            return progress.epoch > 1 and self.plan.validates(progress.epoch - 1)
        return (self.every_steps > 0 and progress.batches_done < self.plan.batches(progress.epoch)
                and self.plan.steps(progress.epoch, progress.batches_done) % self.every_steps == 0)

    def maybe_save(self, progress: Progress, loss_sum: torch.Tensor) -> None:
        if self.due(progress):
            self.save(progress, loss_sum)

    def save(self, progress: Progress, loss_sum: torch.Tensor) -> None:
        per_rank = distributed.gather_tensors({**rng_state(), "loss_sum": loss_sum}, self.group)
        if self.group.is_main:
            progress.seconds = self.elapsed()
            save(self.resume_dir, progress=progress, settings=self.settings, tensors=per_rank, **self.state)
