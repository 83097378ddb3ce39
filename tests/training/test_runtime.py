"""The process and model made ready for training: torch.compile's fallback, malloc that keeps freed memory."""

import logging
import resource
import sys

import pytest
import torch

from segflow.training.runtime import CompiledOrEager, tune_process_for_training


def test_a_failing_torch_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken(*_):
        raise RuntimeError("inductor: no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda module: broken)
    module = torch.nn.Conv2d(3, 2, 1)
    forward = CompiledOrEager(module)
    x = torch.randn(1, 3, 4, 4)
    with caplog.at_level(logging.WARNING, logger="segflow.training.runtime"):
        outputs = [forward(x), forward(x)]
    assert all(torch.equal(out, module(x)) for out in outputs)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == len(caplog.records) == 1
    assert "no C++ compiler" in caplog.records[0].message


@pytest.mark.skipif(sys.platform != "linux", reason="a glibc malloc setting")
def test_cpu_training_reuses_freed_memory_without_page_faults():
    """What a CPU step frees (here 64 MiB of 256 KiB tensors, like a model's gradients) comes back without the OS
    paging it in anew; glibc's defaults would give the heap's top back (segflow.training.runtime.keep_freed_memory)."""
    tune_process_for_training(torch.device("cpu"))

    def step() -> None:
        tensors = [torch.ones(64 * 1024) for _ in range(256)]
        del tensors

    step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 1000  # 16384 pages when given back
