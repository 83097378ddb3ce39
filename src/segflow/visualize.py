"""Pictures for people: colour palettes, prediction overlays, confusion matrices."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: stages run under DVC, Prefect and CI without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from segflow import IGNORE_INDEX  # noqa: E402


def palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8 colours: the PASCAL VOC bit-interleaving scheme; ignore is white."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[index] = (r, g, b)
    colours[IGNORE_INDEX] = (255, 255, 255)
    return colours


def colorize(mask: np.ndarray, num_classes: int) -> np.ndarray:
    return palette(num_classes)[mask]


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours onto the image; ignored pixels keep the image as it is."""
    coloured = colorize(mask, num_classes).astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * coloured
    blended[mask == IGNORE_INDEX] = image[mask == IGNORE_INDEX]
    return blended.clip(0, 255).astype(np.uint8)


def save_confusion_matrix(confusion: np.ndarray, class_names: list[str], path: Path) -> None:
    """Row-normalised confusion matrix (recall per true class) with raw counts in the title."""
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=np.float64), where=rows > 0)
    size = max(4.0, 0.5 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=90)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (row, col), value in np.ndenumerate(normalised):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                color="white" if value > 0.5 else "black")
    ax.set_title(f"confusion (row-normalised), {int(confusion.sum())} pixels")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_grid(rows: list[list[np.ndarray]], titles: list[str], path: Path) -> None:
    """A grid of images, one row per example; ``titles`` name the columns."""
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), len(titles), figsize=(3 * len(titles), 3 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            axes[r][c].imshow(picture, cmap="viridis" if picture.ndim == 2 else None)
            axes[r][c].axis("off")
            if r == 0:
                axes[r][c].set_title(titles[c])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
