"""What a team checks first about its data, from the validate stage's statistics: the images and their sizes, the
classes, the near-copies, what the split will be, and the training settings the data suggests."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

MAX_CROP = 512  # a larger crop rarely pays on one GPU's memory
IMBALANCE = 10  # commonest / rarest class pixel share above which class weighting is worth a try


def profile(stats: pd.DataFrame, class_names: list[str]) -> dict[str, Any]:
    """Image sizes, near-copy groups and the suggested ``train.crop_size`` and ``train.class_weighting``."""
    decoded = stats[stats["image_decodes"]]
    labeled = decoded[decoded["labeled"]]
    sizes = (decoded["image_width"].astype(str) + "x" + decoded["image_height"].astype(str)).value_counts()
    shorter = int(np.median(np.minimum(labeled["image_width"], labeled["image_height"]))) if len(labeled) else 0
    crop = min(MAX_CROP, max(32, shorter // 32 * 32))
    pixels = labeled[[f"px_{k}" for k in range(len(class_names))]].fillna(0).astype("int64").sum().to_numpy()
    shares = pixels / max(pixels.sum(), 1)
    present = np.flatnonzero(shares > 0)
    rarest, commonest = (present[shares[present].argmin()], present[shares[present].argmax()]) if len(present) else (0, 0)
    imbalance = float(shares[commonest] / shares[rarest]) if len(present) else 1.0
    copies = labeled["picture"].value_counts()
    return {
        "image_sizes": {size: int(count) for size, count in sizes.head(5).items()},
        "distinct_image_sizes": int(len(sizes)),
        "pictures_with_copies": int((copies > 1).sum()),
        "largest_picture_group": int(copies.max()) if len(copies) else 0,
        "suggested": {
            "crop_size": crop,
            "crop_size_because": f"the labeled images' median shorter side, {shorter} px, as a multiple of 32 "
                                 f"up to {MAX_CROP}: whole-image context",
            "class_weighting": imbalance > IMBALANCE,
            "class_weighting_because": f"'{class_names[commonest]}' has {shares[commonest]:.1%} of the labeled "
                                       f"pixels, '{class_names[rarest]}' {shares[rarest]:.2%}: {imbalance:.0f} to 1"
                                       + (f", more than {IMBALANCE} to 1, where median frequency balancing is "
                                          "worth comparing on val" if imbalance > IMBALANCE else ""),
        },
    }


def report(summary: dict[str, Any]) -> str:
    """The validate stage's summary as the Markdown a person reads before training."""
    counts, classes, found = summary["counts"], summary["classes"], summary["profile"]
    sizes = ", ".join(f"{size} ({n})" for size, n in found["image_sizes"].items())
    more = found["distinct_image_sizes"] - len(found["image_sizes"])
    split = counts.get("labeled_per_split") or counts.get("expected_split_sizes")
    split_words = ("predefined: " if counts["predefined_splits"] else "expected, in split groups: ") + ", ".join(
        f"{name} {n}" for name, n in split.items())
    lines = [
        "# The data before training", "",
        f"- Images: {counts['images']} ({counts['labeled']} labeled, {counts['unlabeled']} unlabeled); sizes "
        f"{sizes}{f' and {more} more' if more > 0 else ''}.",
        f"- Pictures: {counts['distinct_labeled_pictures']} distinct among the labeled images; "
        f"{found['pictures_with_copies']} have near-copies (the largest group {found['largest_picture_group']} "
        f"images), kept in one split; {counts['split_groups']} split groups.",
        f"- Split ({split_words}).",
        f"- Ignored pixels: {classes['ignored_pixel_fraction']:.1%} of the labeled images' pixels.", "",
        "| class | pixel share | images |", "|---|---|---|",
        *(f"| {name} | {share:.2%} | {classes['images_containing'][name]} |"
          for name, share in classes["pixel_frequency"].items()), "",
        "Suggested settings:",
        f"- train.crop_size: {found['suggested']['crop_size']} ({found['suggested']['crop_size_because']}).",
        f"- train.class_weighting: {str(found['suggested']['class_weighting']).lower()} "
        f"({found['suggested']['class_weighting_because']}).",
    ]
    return "\n".join(lines) + "\n"
