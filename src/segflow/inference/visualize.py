"""Pictures for people: a class palette, overlays with a legend and an error map, learning curves, per-class IoU
bars and the confusion matrix.

Figures are built with matplotlib's object API (no pyplot state, so no display and nothing to close) and returned
by the ``*_figure`` functions; :func:`save_figure` writes one as PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from segflow import IGNORE_INDEX

DPI = 100
PANEL_INCHES = 4.8  # a 480-pixel-wide image (CamVid) is drawn at its own resolution
LEGEND_ROWS = 25  # legend entries per column before a new column starts
# Okabe-Ito colours, told apart with the common colour-vision deficiencies.
RIGHT_COLOUR = (0, 158, 115)  # bluish green
WRONG_COLOUR = (213, 94, 0)  # vermillion
IGNORE_COLOUR = (255, 255, 255)


def _qualitative_colours() -> list[tuple[float, float, float]]:
    """matplotlib's tab20 reordered: its nine strong hues, their light shades, the two grays last (a gray class
    overlaid on a photograph looks untinted)."""
    tab20 = matplotlib.colormaps["tab20"].colors  # ten hues, each strong then light; the eighth is gray
    strong, light, gray = tab20[0::2], tab20[1::2], 7
    return [*strong[:gray], *strong[gray + 1 :], *light[:gray], *light[gray + 1 :], strong[gray], light[gray]]


def palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8 colours indexed by class: distinct qualitative colours up to 20 classes (see
    :func:`_qualitative_colours`), evenly spaced turbo colours beyond; ignore (255) is white."""
    if num_classes <= 20:
        colours = _qualitative_colours()[:num_classes]
    else:
        colours = matplotlib.colormaps["turbo"](np.linspace(0, 1, num_classes))[:, :3]
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:num_classes] = np.round(np.asarray(colours) * 255)
    table[IGNORE_INDEX] = IGNORE_COLOUR
    return table


def colorize(mask: np.ndarray, num_classes: int) -> np.ndarray:
    return palette(num_classes)[mask]


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """Class colours blended onto the HxWx3 image; ignored pixels keep the image as it is."""
    classes = [c for c in np.unique(mask) if c < num_classes]
    colours = palette(num_classes)
    return _draw(image, [mask == c for c in classes], [colours[c] for c in classes], alpha)


def error_map(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """The image in gray, right pixels tinted green, wrong ones vermillion, ignored ones white."""
    gray = np.repeat(np.asarray(image, np.float32).mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
    ignored = truth == IGNORE_INDEX
    right = ~ignored & (prediction == truth)
    return _draw(gray, [right, ~ignored & ~right, ignored], [RIGHT_COLOUR, WRONG_COLOUR, IGNORE_COLOUR], alpha)


def _draw(image: np.ndarray, masks: list[np.ndarray], colours: list, alpha: float) -> np.ndarray:
    """torchvision's draw_segmentation_masks on HxWx3 numpy arrays."""
    if not masks:  # nothing to draw (torchvision would warn)
        return image
    from torchvision.utils import draw_segmentation_masks  # seconds to import: only when something is drawn

    drawn = draw_segmentation_masks(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
                                    torch.from_numpy(np.stack(masks)), alpha=alpha,
                                    colors=[tuple(int(v) for v in c) for c in colours])
    return drawn.permute(1, 2, 0).numpy()


@dataclass(frozen=True)
class Example:
    """A test image with its truth and prediction, and the IoU it is ranked by."""

    image_id: str
    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray
    iou: float


def overlay_figure(example: Example, class_names: Sequence[str], rank: int, of_images: int) -> Figure:
    """Image and error map above, truth and prediction overlays below; beside them the error map's colours and a
    legend of the classes in the truth or the prediction. The title names the image, its IoU and its ``rank``
    among the ``of_images`` test images, worst first."""
    num_classes = len(class_names)
    height, width = example.truth.shape
    panel_height = PANEL_INCHES * min(max(height / width, 0.25), 4.0)
    fig = Figure(figsize=(2 * PANEL_INCHES + 2.5, 2 * panel_height + 0.8), layout="constrained")
    fig.suptitle(f"{example.image_id}: IoU {example.iou:.3f}, the {_ordinal(rank)} worst of {of_images} test images "
                 "(mean over the classes in its truth or prediction)")
    panels = {
        "image": example.image,
        "errors": error_map(example.image, example.truth, example.prediction),
        "truth": overlay(example.image, example.truth, num_classes),
        "prediction": overlay(example.image, example.prediction, num_classes),
    }
    for ax, (name, picture) in zip(fig.subplots(2, 2).flat, panels.items()):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    shown = np.union1d(np.unique(example.truth), np.unique(example.prediction))
    colours = palette(num_classes) / 255
    errors = [Patch(color=np.array(RIGHT_COLOUR) / 255, label="right"),
              Patch(color=np.array(WRONG_COLOUR) / 255, label="wrong"),
              Patch(facecolor=np.array(IGNORE_COLOUR) / 255, edgecolor="0.5", label="ignored")]
    fig.legend(handles=errors, title="errors", loc="outside right upper")
    classes = [Patch(color=colours[c], label=class_names[c]) for c in shown if c < num_classes]
    fig.legend(handles=classes, title="classes", loc="outside right lower",
               ncols=math.ceil(len(classes) / LEGEND_ROWS))
    return fig


def save_overlays(examples: Sequence[Example], class_names: Sequence[str], folder: Path, of_images: int) -> None:
    """One PNG per example, ``NN_<image id>.png`` in ranking order: ``examples`` are the worst of ``of_images``
    test images by per-image IoU, worst first."""
    folder.mkdir(parents=True, exist_ok=True)
    for rank, example in enumerate(examples, start=1):
        figure = overlay_figure(example, class_names, rank, of_images)
        save_figure(figure, folder / f"{rank:02d}_{example.image_id}.png")


def legend_figure(class_names: Sequence[str]) -> Figure:
    """The class colours of masks and overlays, alone: the key to ``segflow predict``'s pictures."""
    colours = palette(len(class_names)) / 255
    handles = [Patch(color=colours[c], label=name) for c, name in enumerate(class_names)]
    handles.append(Patch(facecolor=np.array(IGNORE_COLOUR) / 255, edgecolor="0.5", label=f"ignore ({IGNORE_INDEX})"))
    columns = math.ceil(len(handles) / LEGEND_ROWS)
    fig = Figure(figsize=(2.2 * columns, 0.3 * min(len(handles), LEGEND_ROWS) + 0.6))
    fig.legend(handles=handles, title="classes", loc="center", ncols=columns, frameon=False)
    return fig


def learning_curves_figure(history: Sequence[dict], end: dict | None = None) -> Figure:
    """Train loss and val mIoU per epoch (epochs not validated have no val point), the best epoch starred, and
    with ``end`` (the card's ``training_end``) where training stopped and why."""
    fig = Figure(figsize=(7, 6), layout="constrained")
    loss_ax, miou_ax = fig.subplots(2, 1, sharex=True)
    loss_ax.plot([h["epoch"] for h in history], [h["train_loss"] for h in history], marker=".")
    loss_ax.set_ylabel("train loss")
    loss_ax.set_title("learning curves")
    validated = [h for h in history if h.get("val_miou") is not None]
    epochs, mious = [h["epoch"] for h in validated], [h["val_miou"] for h in validated]
    miou_ax.plot(epochs, mious, marker="o", color="tab:green")
    if validated:
        best = int(np.argmax(mious))
        miou_ax.plot(epochs[best], mious[best], marker="*", markersize=16, color="tab:orange", linestyle="none",
                     label=f"best: {mious[best]:.3f} at epoch {epochs[best]}")
        miou_ax.legend(loc="lower right")
    if end is not None:
        for ax in (loss_ax, miou_ax):
            ax.axvline(end["epoch"], color="0.4", linestyle="--")
        why = (f"stopped at epoch {end['epoch']} of {end['max_epochs']}: no better val mIoU in {end['patience']} "
               "validations (train.patience)" if end["reason"] == "patience" else
               f"still improving at its last epoch ({end['epoch']}): raise train.epochs" if end["still_improving"]
               else f"trained train.epochs ({end['epoch']})")
        miou_ax.set_title(why, fontsize=9)
    miou_ax.set_ylabel("val mIoU")
    miou_ax.set_xlabel("epoch")
    miou_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (loss_ax, miou_ax):
        ax.grid(alpha=0.3)
    return fig


def per_class_iou_figure(per_class_iou: dict[str, float | None], miou: float | None, split: str = "test") -> Figure:
    """Horizontal IoU bars with their values and the mIoU dashed; a class absent from the split's truth and
    predictions (null) is marked n/a, not drawn as 0."""
    names = list(per_class_iou)
    values = [per_class_iou[n] for n in names]
    fig = Figure(figsize=(7, 0.35 * len(names) + 1.4), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh(names, [0 if v is None else v for v in values], color="tab:blue")
    ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.2f}" for v in values], padding=3)
    title = f"{split} IoU per class"
    if miou is not None:
        ax.axvline(miou, color="tab:orange", linestyle="--")
        title += f" (dashed: mIoU {miou:.3f})"
    ax.set_title(title)
    ax.set_xlim(0, 1.1)
    ax.invert_yaxis()  # first class on top
    ax.set_xlabel("IoU")
    return fig


def confusion_matrix_figure(confusion: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Row-normalised confusion matrix (recall per true class), the pixel count in the title; a class without
    true pixels has an empty row marked n/a."""
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.full(confusion.shape, np.nan), where=rows > 0)
    size = max(4.0, 0.5 * len(class_names) + 2)
    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=90)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (row, col), value in np.ndenumerate(normalised):
        ax.text(col, row, "n/a" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7,
                color="white" if value > 0.5 else "black")
    ax.set_title(f"confusion, row-normalised\n({int(confusion.sum()):,} pixels)")
    return fig


def save_grid(rows: list[list[np.ndarray]], titles: list[str], path: Path) -> None:
    """A grid of images, one row per example; ``titles`` name the columns."""
    if not rows:
        return
    fig = Figure(figsize=(3 * len(titles), 3 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(titles), squeeze=False)
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            axes[r][c].imshow(picture, cmap="viridis" if picture.ndim == 2 else None)
            axes[r][c].axis("off")
            if r == 0:
                axes[r][c].set_title(titles[c])
    fig.savefig(path, dpi=80)


def save_figure(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # a legend-only figure is cut to its legend


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
