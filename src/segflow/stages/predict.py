"""Predict a folder of images with a local or registered model: index masks, colour overlays, a submission CSV.

A registered model (or a folder downloaded from one) predicts with the inference settings its card carries: the
ones its registered test score was measured with, which the served model uses too, so `segflow predict` gives
the served masks whatever ``evaluate.inference`` says today. A model folder straight from training predicts as
``evaluate.inference`` says (sliding window, test-time augmentation), as ``segflow evaluate`` scores it.
"""

from __future__ import annotations

import contextlib
import csv
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from segflow.config import InferenceParams, Params
from segflow.data.datasets import stack_padded, to_tensor
from segflow.data.imageio import header_size, read_image, write_image, write_mask
from segflow.errors import SegflowError
from segflow.fsutil import atomic_open, owned_dir, refuse_overlap
from segflow.inference.card import registered_inference
from segflow.inference.predictor import (
    check_encoded_size,
    check_image_size,
    load_model,
    predict_classes,
    resolve_device,
    resolved_inference,
)
from segflow.inference.visualize import legend_figure, overlay, palette, save_figure
from segflow.registry.model_source import resolve_model_dir

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
CSV_HEADER = ["image_id", "mask"]


@dataclass(frozen=True)
class PredictResult:
    images: int
    out_dir: Path
    csv_file: Path | None
    refused: dict[str, str] = field(default_factory=dict)  # image path -> why it was not predicted (too large)


def within_limits(paths: list[Path], inference: InferenceParams) -> dict[Path, str]:
    """The images ``inference``'s limits refuse (``max_image_mb``, ``max_pixels``), each with the reason, found
    from the file size and header alone, before anything is decoded."""
    refused = {}
    for path in paths:
        try:
            check_encoded_size(path.stat().st_size, inference, str(path))
            check_image_size(*header_size(path), inference, str(path))
        except SegflowError as exc:
            refused[path] = str(exc)
    return refused


def list_images(images_dir: Path) -> list[Path]:
    """The images directly in ``images_dir``, sorted by name; their stems name the outputs, so they must differ."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise SegflowError(f"{images_dir}: not a folder of images.")
    paths = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SegflowError(f"{images_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found.")
    shared = sorted(stem for stem, count in Counter(p.stem for p in paths).items() if count > 1)
    if shared:
        raise SegflowError(
            f"{images_dir}: several images share the name {shared[0]!r} (e.g. .png and .jpg); "
            "their masks would overwrite each other."
        )
    return paths


def csv_mask(mask: torch.Tensor, size: tuple[int, int]) -> str:
    """HxW class indices resized (nearest) to ``size`` (height, width): space-separated, row by row."""
    resized = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0]
    return " ".join(map(str, resized.long().flatten().tolist()))


def _check_outputs(images_dir: Path, out_dir: Path, csv_file: Path | None) -> None:
    # ``out_dir`` is replaced whole: it must not hold, or lie inside, the input images, nor hold the CSV.
    refuse_overlap(out_dir, [images_dir], "segflow predict")
    if csv_file is not None and csv_file.resolve().is_relative_to(out_dir.resolve()):
        raise SegflowError(f"--csv {csv_file} lies inside --out {out_dir}, which is replaced whole; put it elsewhere.")
    # Checked before anything is written: the CSV is written last, when --out is already in place.
    if csv_file is not None and csv_file.is_dir():
        raise SegflowError(f"--csv {csv_file} is a folder; give the path of the CSV file to write.")
    if csv_file is not None and not csv_file.parent.is_dir():
        raise SegflowError(f"--csv {csv_file}: its folder {csv_file.parent} does not exist (or is a file); create "
                           "it, or give another path.")


def predict(
    params: Params, *, model: str | Path, images_dir: Path, out_dir: Path, csv_file: Path | None = None,
) -> PredictResult:
    """Write ``out_dir/masks/<stem>.png`` (palette PNGs: class indices a viewer shows in colour) and
    ``out_dir/overlays/<stem>.png`` for every image in ``images_dir``, ``out_dir/legend.png`` naming the colours,
    and with ``csv_file`` one ``image_id,mask`` row per image; nothing is written unless every image succeeds.

    ``model`` is a model folder (``model.json`` + ``model.safetensors``) or an MLflow model URI.
    """
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    csv_file = Path(csv_file) if csv_file is not None else None
    paths = list_images(images_dir)
    _check_outputs(images_dir, out_dir, csv_file)
    device = resolve_device(params.train.device)
    with resolve_model_dir(model) as model_dir:
        network, card = load_model(model_dir, device)
        registered = registered_inference(card, model_dir)
        inference = registered or resolved_inference(params.evaluate.inference, card, model_dir)
    if registered is not None:
        log.info("%s predicts with the inference settings it was registered with (%s), not evaluate.inference",
                 model, inference.model_dump(mode="json"))
    cfg = params.predict
    refused = within_limits(paths, inference)
    for reason in refused.values():
        log.error("%s", reason)
    paths = [path for path in paths if path not in refused]  # the others are predicted all the same
    csv_output = atomic_open(csv_file, "w", newline="") if csv_file is not None else contextlib.nullcontext()
    with csv_output as csv_handle, owned_dir(out_dir, "segflow predict", [images_dir]) as staging:
        (staging / "masks").mkdir()
        (staging / "overlays").mkdir()
        colours = palette(card.num_classes)  # the masks' and the overlays' colours, named in legend.png
        save_figure(legend_figure(card.classes), staging / "legend.png")
        rows = csv.writer(csv_handle) if csv_handle is not None else None
        if rows is not None:
            rows.writerow(CSV_HEADER)
        for start in range(0, len(paths), cfg.batch_size):
            chunk = paths[start : start + cfg.batch_size]
            images = [read_image(path) for path in chunk]
            batch = stack_padded([to_tensor(image) for image in images]).to(device)
            classes = predict_classes(network, batch, inference)
            for path, image, predicted in zip(chunk, images, classes):
                mask = predicted[: image.shape[0], : image.shape[1]]  # drop the batch padding
                mask_array = mask.to(torch.uint8).cpu().numpy()
                write_mask(staging / "masks" / f"{path.stem}.png", mask_array, colours)
                write_image(staging / "overlays" / f"{path.stem}.png", overlay(image, mask_array, card.num_classes))
                if rows is not None:
                    rows.writerow([path.stem, csv_mask(mask, cfg.csv_size)])
    return PredictResult(len(paths), out_dir, csv_file, {str(path): reason for path, reason in refused.items()})
