"""The data report: sizes, near-copies, the suggested crop size and class weighting, read from the statistics."""

from __future__ import annotations

import pandas as pd

from segflow.data.report import profile, report

CLASSES = ["background", "car", "sign"]


def _stats(sizes: list[tuple[int, int]], pixels: list[list[int]], pictures: list[int]) -> pd.DataFrame:
    return pd.DataFrame({
        "image_decodes": True, "labeled": True,
        "image_width": [w for w, _ in sizes], "image_height": [h for _, h in sizes],
        **{f"px_{k}": [row[k] for row in pixels] for k in range(len(CLASSES))},
        "picture": pictures,
    })


def test_the_crop_follows_the_median_shorter_side_and_weighting_the_imbalance():
    stats = _stats([(480, 360), (480, 360), (1024, 700)], [[900, 95, 5], [900, 90, 10], [800, 190, 10]],
                   pictures=[0, 0, 1])
    found = profile(stats, CLASSES)
    assert found["suggested"]["crop_size"] == 352  # median shorter side 360, down to a multiple of 32
    assert found["image_sizes"] == {"480x360": 2, "1024x700": 1}
    assert (found["pictures_with_copies"], found["largest_picture_group"]) == (1, 2)
    assert found["suggested"]["class_weighting"] is True  # background 2600 : sign 25 pixels
    assert "'sign' 0.83%: 104 to 1" in found["suggested"]["class_weighting_because"]

    balanced = profile(_stats([(2000, 1500)] * 2, [[50, 40, 10], [50, 40, 10]], pictures=[0, 1]), CLASSES)
    assert balanced["suggested"]["crop_size"] == 512  # at most MAX_CROP
    assert balanced["suggested"]["class_weighting"] is False  # 5 to 1
    assert balanced["pictures_with_copies"] == 0


def test_the_report_reads_the_summary():
    stats = _stats([(96, 96)] * 2, [[50, 40, 10], [50, 40, 10]], pictures=[0, 0])
    summary = {"counts": {"images": 3, "labeled": 2, "unlabeled": 1, "distinct_labeled_pictures": 1,
                          "split_groups": 1, "predefined_splits": False,
                          "expected_split_sizes": {"train": 1, "val": 0, "test": 0}},
               "classes": {"pixel_frequency": {"background": 0.5, "car": 0.4, "sign": 0.1}, "ignored_pixel_fraction": 0,
                           "images_containing": {"background": 2, "car": 2, "sign": 2}},
               "profile": profile(stats, CLASSES)}
    text = report(summary)
    assert "- Images: 3 (2 labeled, 1 unlabeled); sizes 96x96 (2)." in text
    assert "1 have near-copies (the largest group 2 images)" in text
    assert "| sign | 10.00% | 2 |" in text
    assert "- train.crop_size: 96 (" in text and "- train.class_weighting: false (" in text
