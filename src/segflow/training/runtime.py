"""The process and the model made ready for fast training steps: malloc, cuDNN, channels-last, torch.compile, DDP."""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from segflow import models
from segflow.training.distributed import ProcessGroup
from segflow.training.weights import load_initial_weights

log = logging.getLogger(__name__)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # the largest glibc accepts on 64-bit, and the cap of its adaptive threshold
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> None:
    """Make glibc's malloc keep the memory one CPU training step frees for the next step (process-wide).

    A step frees its activations and, at its end, its gradients (``zero_grad(set_to_none=True)``), then allocates
    them again. By default glibc gives the top of its heap back to the OS once more than twice its adaptive mmap
    threshold lies free there: when the freed gradients end up there (it depends on whatever else the process
    allocated, e.g. a second model in benchmarks/train_throughput.py), each backward page-faults all of them in
    again (24k minor faults, ~100 MB, per Unet-ResNet34 step: 10-35% of the step on 2 cores). Fixed thresholds
    (which also switch the adaptive ones off) keep blocks up to 32 MiB on the heap and its top in the process,
    whose resident size then stays at the step's peak, reached every step anyway. Linux/glibc only; elsewhere
    nothing (musl's mallopt is a no-op)."""
    if sys.platform != "linux":
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def tune_process_for_training(device: torch.device) -> None:
    """Process-wide settings for fast training steps on ``device``: on CUDA cuDNN benchmarks its kernels and
    keeps the fastest; on the CPU malloc keeps freed memory for the next step (:func:`keep_freed_memory`)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        keep_freed_memory()


def prepare_model(model: nn.Module, device: torch.device, sync_batchnorm: bool = False) -> nn.Module:
    """On the device; on CUDA channels-last (tensor cores want NHWC)."""
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


class CompiledOrEager:
    """``torch.compile(module)``; when compiling fails (no C++ compiler, an unsupported op) one warning, then
    the module runs eagerly. Compilation happens at the first call, so that is the only call whose errors are
    taken for the compiler's: an error of a later call is the model's own and goes up as it is."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.compiled: Callable[..., Any] | None = None
        self.first_call = True
        try:
            self.compiled = torch.compile(module)
        except Exception as exc:  # noqa: BLE001 - any compiler problem: eager is always correct
            self._give_up(exc)

    def __call__(self, images: torch.Tensor) -> Any:
        if self.compiled is None:
            return self.module(images)
        if not self.first_call:
            return self.compiled(images)
        try:
            output = self.compiled(images)
        except Exception as exc:  # noqa: BLE001 - the first call compiles; the eager call below shows a model error
            self._give_up(exc)
            return self.module(images)
        self.first_call = False
        return output

    def _give_up(self, exc: Exception) -> None:
        log.warning("torch.compile failed, training without it (train.compile: false hides this): %s",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self.compiled = None


def build_network(
    arch: str, classes: list[str], options: dict[str, Any], group: ProcessGroup, *, sync_batchnorm: bool,
    init_from: Path | None,
) -> tuple[nn.Module, nn.Module, list[str]]:
    """The model on the training device, what the training step calls (the model itself, or its
    DistributedDataParallel wrapper under torchrun), and the tensors a warm start re-initialised."""
    network = models.build(arch, num_classes=len(classes), **options)
    reinitialised = [] if init_from is None else load_initial_weights(network, arch, classes, init_from)
    device = group.device
    # PyTorch's SyncBatchNorm runs on CUDA only: CPU processes (gloo) keep their own batch statistics.
    model = prepare_model(network, device, sync_batchnorm=group.distributed and sync_batchnorm and device.type == "cuda")
    if not group.distributed:
        return model, model, reinitialised
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, ddp, reinitialised
