"""Training throughput: segflow's training step against a plain fp32 reference loop, same model and data.

segflow: the code path of ``segflow train`` (segflow.training.loop.TrainStep: bf16/fp16 autocast, channels-last, cuDNN
autotuning, fused optimizer, no host sync per step; the loader with pinned memory, EpochSampler and SeededDataset;
images from the decoded-image cache, segflow.stages.cache, as ``train.decoded_cache: true`` in params.yaml; with
``--batch-augment`` on, default on CUDA as ``train.batch_augment: auto``, the loader yields whole uint8 images and
the random scale, crop and flip run per batch on the device, segflow.data.datasets.BatchAugment).
reference: torchvision's references/segmentation style: ``model.train()``, fp32, ``loss.item()`` every step, a
shuffling DataLoader of per-image CPU transforms decoding each image each time. Both take the same images
(written once to a temporary folder) through segflow's SegmentationDataset (random scale, crop, flip), with the
same optimizer (SGD, momentum 0.9, poly LR: torchvision's recipe; the optimizer is a recipe choice, not a
speed-up, so segflow's train.optimizer is set to match).

It first prints what reading an image and its mask costs, decoding the files or from the cache.

Fairness: both loops are built first, each runs the same untimed warm-up steps, then the timed steps run in short
alternating blocks (segflow, reference, reference, segflow, ...; the device is synchronised around each), and
images/s come from the median block, so a drift in machine speed or a burst of other load on a shared machine hits
both alike and decides nothing. On CUDA it also prints the share of the bf16 matmul peak (measured here with a
large matmul; model FLOPs per image from FlopCounterMode, x3 for forward + backward) and the GPU idle share of
segflow's loop: the gaps between GPU work (kernels, copies) over a few extra profiled steps, i.e. the time the
data pipeline or the host leaves the GPU waiting. Everywhere it prints the data wait share (host time blocked on
the next batch / total), and at the end its total wall time. The last line is ``ratio: X``, the geometric mean
over the models of segflow / reference images per second.

    python benchmarks/train_throughput.py --device cuda --size 512 --batch 8 --steps 20
    python benchmarks/train_throughput.py --device cpu --size 128 --steps 10   # Unet-ResNet34, batch 2: < 1 min

On the CPU segflow runs the same fp32 work as the reference (autocast and channels-last are CUDA-only; channels-
last was no faster on a 2-core AVX-512 CPU), so the ratio there shows only that segflow adds no cost: about 1.
Segflow's training on the CPU makes glibc's malloc keep the memory a step frees (segflow.training.runtime.keep_freed_memory,
from tune_process_for_training): without it, whenever the gradients segflow frees at the end of its step lay at the top of the
heap (as they did here, beside the reference's model), glibc gave them back to the OS and every backward page-
faulted ~100 MB in again (ratio 0.6-0.9). The setting is process-wide: the reference runs with it too.
On a machine that other processes keep busy, OpenMP threads spinning at barriers take the cores from the
thread they wait for: with libgomp's default (spin first) the 2-core CPU run took 160-170 s beside two other training
jobs, against 17 s with ``OMP_WAIT_POLICY=PASSIVE``, which this script therefore sets unless the environment
says otherwise (for both loops alike). ``OMP_NUM_THREADS=1`` gives the steadiest numbers.
"""

from __future__ import annotations

import os
import time

STARTED = time.perf_counter()  # the total wall time printed at the end includes the imports (seconds of them)
# Read when torch loads OpenMP: threads that wait at a barrier sleep instead of spinning (see the docstring).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from segflow import IGNORE_INDEX, models
from segflow.config import parse_params
from segflow.data.datasets import BatchAugment, Sample, SegmentationDataset, batch_augment_on, pad_collate
from segflow.data.decoded_cache import DecodedCache, open_cache
from segflow.data.imageio import read_image, read_mask, write_image, write_mask
from segflow.stages.cache import build_cache
from segflow.training.distributed import EpochSampler, SeededDataset
from segflow.training.loop import TrainStep
from segflow.training.losses import LossWeighting
from segflow.training.optim import build_optimization
from segflow.training.runtime import prepare_model, tune_process_for_training

# benchmark name -> (segflow registry name, builder options)
MODELS = {
    "unet-resnet34": ("unet", {"encoder_name": "resnet34"}),
    "deeplabv3plus-resnet50": ("deeplabv3plus", {"encoder_name": "resnet50"}),
    "pspnet-resnet50": ("pspnet", {"backbone": "resnet50"}),
}
CPU_MODELS = ["unet-resnet34"]  # the others take many seconds per step on a small CPU
NUM_CLASSES = 21
AUX_WEIGHT = 0.4
SGD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}  # torchvision's segmentation recipe, both loops
PROFILED_STEPS = 5  # extra segflow steps on CUDA, under the profiler, for the GPU idle share

Batch = dict[str, torch.Tensor]


def write_images(folder: Path, count: int, size: int) -> list[Sample]:
    """Smooth random images (they compress and decode like photos, unlike noise) and blocky masks, with the
    ingest stage's manifest.csv."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    manifest = ["image_id,image_path,mask_path,width,height,split"]
    for i in range(count):
        coarse = rng.integers(0, 256, (size // 16 + 1, size // 16 + 1, 3), dtype=np.uint8)
        image = np.kron(coarse, np.ones((16, 16, 1), np.uint8))[:size, :size]
        mask = np.kron(rng.integers(0, NUM_CLASSES, (size // 32 + 1, size // 32 + 1)), np.ones((32, 32)))[:size, :size]
        write_image(folder / f"{i}.png", image)
        write_mask(folder / f"{i}_mask.png", mask.astype(np.uint8))
        samples.append(Sample(str(i), folder / f"{i}.png", folder / f"{i}_mask.png"))
        manifest.append(f"{i},{i}.png,{i}_mask.png,{size},{size},train")
    (folder / "manifest.csv").write_text("\n".join(manifest) + "\n")
    return samples


def read_seconds(samples: list[Sample], cache: DecodedCache) -> tuple[float, float]:
    """Seconds per image and its mask: decoding the files, reading the decoded cache."""
    def decode(sample: Sample) -> None:
        read_image(sample.image_path)
        read_mask(sample.mask_path)

    def from_cache(sample: Sample) -> None:
        cache.image(sample.image_id)
        cache.mask(sample.image_id)

    seconds = []
    for read in (decode, from_cache):
        started = time.perf_counter()
        for sample in samples:
            read(sample)
        seconds.append((time.perf_counter() - started) / len(samples))
    return seconds[0], seconds[1]


def forever(loader: DataLoader, sampler: EpochSampler | None = None) -> Iterator[Batch]:
    epoch = 0
    while True:
        epoch += 1
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Loop:
    """A training loop under test: its step and its endless batches, and the seconds of its timed blocks."""

    step: Callable[[Batch], object]
    batches: Iterator[Batch]
    device: torch.device
    block_seconds: list[float] = field(default_factory=list)
    waiting: float = 0.0  # of the blocks' seconds, blocked on the next batch

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step(next(self.batches))

    def timed(self, steps: int) -> None:
        sync(self.device)
        started = time.perf_counter()
        for _ in range(steps):
            before = time.perf_counter()
            batch = next(self.batches)
            self.waiting += time.perf_counter() - before
            self.step(batch)
        sync(self.device)
        self.block_seconds.append(time.perf_counter() - started)

    def images_per_second(self, images_per_block: int) -> float:
        return images_per_block / statistics.median(self.block_seconds)

    def waiting_share(self) -> float:
        return self.waiting / sum(self.block_seconds)


def measure(loops: list[Loop], warmup: int, steps: int, block: int) -> None:
    """``warmup`` untimed steps of each, then ``steps`` timed ones of each in blocks of ``block`` steps, in the
    order A B B A A B ..."""
    for loop in loops:
        loop.run(warmup)
    for number in range(max(1, steps // block)):
        for loop in loops if number % 2 == 0 else loops[::-1]:
            loop.timed(block)


def segflow_loop(arch: str, options: dict, dataset: SegmentationDataset, args, device: torch.device,
                 batch_augment: BatchAugment | None) -> Loop:
    train = {"batch_size": args.batch, "crop_size": args.size, "num_workers": args.workers, "optimizer": "sgd", **SGD}
    cfg = parse_params({"train": train, "models": {arch: options}}).train
    tune_process_for_training(device)  # as segflow.stages.train.train does before it builds the model
    model = prepare_model(models.build(arch, NUM_CLASSES, **options), device)
    model.train()
    recipe = models.recipe(arch, cfg.overrides())  # SGD as the reference loop's, with the recipe's groups
    optimization = build_optimization(recipe, model, device, total_steps=args.total_steps, amp=cfg.amp,
                                      encoder_loaded=False)
    step = TrainStep(model, optimization, LossWeighting(aux_weight=AUX_WEIGHT), device=device,
                     batch_augment=batch_augment)
    sampler = EpochSampler(len(dataset), seed=0)
    loader = DataLoader(SeededDataset(dataset), batch_size=args.batch, sampler=sampler, drop_last=True,
                        num_workers=args.workers, pin_memory=device.type == "cuda", collate_fn=pad_collate,
                        persistent_workers=args.workers > 0)
    return Loop(step, forever(loader, sampler), device)


def reference_loop(arch: str, options: dict, dataset: SegmentationDataset, args, device: torch.device) -> Loop:
    model = models.build(arch, NUM_CLASSES, **options).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), **SGD)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=args.total_steps, power=0.9)
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
                        collate_fn=pad_collate, persistent_workers=args.workers > 0)

    def step(batch: Batch) -> None:
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        output = model(images)
        outputs = output if isinstance(output, dict) else {"out": output}
        loss = sum((1 if name == "out" else AUX_WEIGHT) * F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
                   for name, logits in outputs.items())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss.item()

    return Loop(step, forever(loader), device)


def gpu_idle_share(loop: Loop, steps: int) -> float:
    """Share of the span of ``steps`` more steps in which the GPU runs nothing, from the profiler's device
    timeline (kernels, copies, memsets): what the data pipeline and the host leave idle."""
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        loop.run(steps)
        sync(loop.device)
    spans = sorted((event.time_range.start, event.time_range.end) for event in profiler.events()
                   if event.device_type == DeviceType.CUDA and not event.is_user_annotation)
    first, busy_until, busy = spans[0][0], spans[0][0], 0.0
    for start, end in spans:  # length of the union of the (overlapping) spans
        busy += max(0.0, end - max(start, busy_until))
        busy_until = max(busy_until, end)
    return 1 - busy / (busy_until - first)


def bf16_peak_flops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def train_flops_per_image(arch: str, options: dict, size: int, device: torch.device) -> float:
    model = models.build(arch, NUM_CLASSES, **options).to(device).train()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(2, 3, size, size, device=device))  # 2: batch norm needs more than one value
    return 3 * counter.get_total_flops() / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512, help="image and crop size (default 512)")
    parser.add_argument("--batch", type=int, default=None, help="per step (default 8 on CUDA, 2 on CPU)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on CUDA, 2 on CPU)")
    parser.add_argument("--block", type=int, default=None, help="steps per timed block (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: CPU cores, at most 8)")
    parser.add_argument("--batch-augment", choices=["auto", "true", "false"], default="auto",
                        help="segflow's scale, crop and flip per batch on the device (train.batch_augment; "
                             "default auto: on CUDA only)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                        help=f"default on CUDA: all ({', '.join(MODELS)}); on CPU: {', '.join(CPU_MODELS)} only")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.batch = args.batch or (8 if cuda else 2)
    args.block = min(args.steps, args.block or (5 if cuda else 1))
    args.workers = args.workers if args.workers is not None else min(8, len(os.sched_getaffinity(0)))
    args.total_steps = args.warmup + args.steps + (PROFILED_STEPS if cuda else 0)
    names = args.models or (list(MODELS) if cuda else CPU_MODELS)
    batch_augmenting = batch_augment_on({"true": True, "false": False}.get(args.batch_augment, "auto"), device)
    peak = bf16_peak_flops(device) if cuda else None
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else 'cpu'}), size {args.size}, "
          f"batch {args.batch}, {args.steps} timed steps in blocks of {args.block} after {args.warmup}, "
          f"{args.workers} workers, segflow augments {'per batch on the device' if batch_augmenting else 'per image'}"
          + (f", bf16 matmul peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))

    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        # One epoch covers every step, so no loop pays for a loader restarting mid-measurement.
        data = Path(tmp) / "ingested"  # the cache is written beside the ingested folder, never inside it
        samples = write_images(data, max(args.batch * args.total_steps, 32), args.size)
        build_cache(data, Path(tmp) / "cache")
        cache = open_cache(Path(tmp) / "cache", data)
        decode_seconds, cache_seconds = read_seconds(samples, cache)
        print(f"reading an image and its mask: decoding {decode_seconds * 1e3:.2f} ms, "
              f"decoded cache {cache_seconds * 1e3:.3f} ms")
        augment = parse_params({}).train.augment
        decoding = SegmentationDataset(samples, crop_size=args.size, augment=augment)
        cached = SegmentationDataset(samples, crop_size=args.size, augment=augment, cache=cache,
                                     batch_augment=batch_augmenting)
        batch_augment = BatchAugment(augment, args.size) if batch_augmenting else None
        for name in names:
            arch, options = MODELS[name]
            ours = segflow_loop(arch, options, cached, args, device, batch_augment)
            reference = reference_loop(arch, options, decoding, args, device)
            measure([ours, reference], args.warmup, args.steps, args.block)
            ours_rate, reference_rate = (loop.images_per_second(args.batch * args.block) for loop in (ours, reference))
            ratios.append(ours_rate / reference_rate)
            line = (f"{name}: segflow {ours_rate:.2f} img/s, reference {reference_rate:.2f} img/s, "
                    f"ratio {ours_rate / reference_rate:.2f}, data wait {ours.waiting_share():.1%} "
                    f"(reference {reference.waiting_share():.1%})")
            if cuda:
                flops = train_flops_per_image(arch, options, args.size, device)
                line += (f", {flops / 1e9:.0f} GFLOP/img, segflow at {ours_rate * flops / peak:.1%} of bf16 peak "
                         f"(reference {reference_rate * flops / peak:.1%}), "
                         f"GPU idle {gpu_idle_share(ours, PROFILED_STEPS):.1%}")
            print(line, flush=True)
            del ours, reference  # the loaders' workers and the models go before the next model's
            if cuda:
                torch.cuda.empty_cache()
    print(f"total wall time {time.perf_counter() - STARTED:.0f} s")
    print(f"ratio: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}")


if __name__ == "__main__":
    main()
