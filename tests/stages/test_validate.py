"""Validate stage: a clean dataset passes; each kind of broken data fails its own check and is named."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from segflow.config import SplitParams, ValidateParams, parse_params
from segflow.data.imageio import write_image, write_mask
from segflow.errors import SegflowError, ValidationFailed
from segflow.stages.ingest import ingest_coco
from segflow.stages.split import make_splits
from segflow.stages.validate import validate

CLASSES = ["background", "cat", "dog"]
LIMITS = dict(min_train=2, min_val=2, min_test=2, val_fraction=0.2, test_fraction=0.2,
              min_labeled_pixel_fraction=0.1, min_foreground_image_fraction=0.1)
SPLIT_KEYS = {"seed", "val_fraction", "test_fraction", "labeled_fraction", "group_by", "near_copy_similarity"}


def sections(**overrides) -> tuple[ValidateParams, SplitParams]:
    """The validate and split sections of LIMITS with ``overrides``, as params.yaml would give them."""
    values = {**LIMITS, **overrides}
    params = parse_params({"validate": {k: v for k, v in values.items() if k not in SPLIT_KEYS},
                           "split": {k: v for k, v in values.items() if k in SPLIT_KEYS}})
    return params.validate_, params.split


def picture(seed: int, height: int = 12, width: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def class_mask(seed: int, height: int = 12, width: int = 16) -> np.ndarray:
    mask = np.random.default_rng(seed).integers(0, len(CLASSES), size=(height, width), dtype=np.uint8)
    mask[0, 0] = 255  # one ignored pixel, as ingest writes for crowd/void regions
    return mask


def write_dataset(data_dir: Path, rows: list[dict]) -> Path:
    """Write the ingest contract: images/, masks/, manifest.csv and classes.json.

    Each row: image_id, image (HxWx3), optional mask (HxW), optional split.
    """
    (data_dir / "images").mkdir(parents=True)
    (data_dir / "masks").mkdir()
    with open(data_dir / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "image_path", "mask_path", "width", "height", "split"])
        for row in rows:
            image_path = f"images/{row['image_id']}.png"
            write_image(data_dir / image_path, row["image"])
            mask_path = ""
            if row.get("mask") is not None:
                mask_path = f"masks/{row['image_id']}.png"
                write_mask(data_dir / mask_path, row["mask"])
            height, width = row["image"].shape[:2]
            writer.writerow([row["image_id"], image_path, mask_path, width, height, row.get("split", "")])
    classes = {"names": CLASSES, "coco_category_ids": None, "ignore_index": 255, "source": "test"}
    (data_dir / "classes.json").write_text(json.dumps(classes))
    return data_dir


def clean_rows(n_labeled: int = 12, n_unlabeled: int = 2, splits: list[str] | None = None) -> list[dict]:
    rows = [
        {"image_id": f"img_{i}", "image": picture(i), "mask": class_mask(i), "split": splits[i] if splits else ""}
        for i in range(n_labeled)
    ]
    rows += [{"image_id": f"unl_{i}", "image": picture(1000 + i)} for i in range(n_unlabeled)]
    return rows


PREDEFINED = ["train"] * 6 + ["val"] * 3 + ["test"] * 3


def failed_checks(out_dir: Path) -> dict[str, dict]:
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["success"] is False
    return {f["check"]: f for f in summary["failures"]}


def test_clean_dataset_passes_and_writes_stats_summary_and_docs(tmp_path):
    data = write_dataset(tmp_path / "data", clean_rows())
    out = tmp_path / "validated"

    result = validate(*sections(), data_dir=data, out_dir=out)

    assert result.success and result.out_dir == out
    stats = pd.read_csv(out / "stats.csv", dtype={"image_id": str})
    assert len(stats) == 14
    assert {"image_id", "content_hash", "px_0", "px_1", "px_2", "px_ignore", "n_bad_values"} <= set(stats.columns)
    labeled = stats[stats["labeled"]]
    first = labeled.set_index("image_id").loc["img_0"]
    expected = np.bincount(class_mask(0).ravel(), minlength=256)
    assert [first["px_0"], first["px_1"], first["px_2"], first["px_ignore"]] == [*expected[:3], expected[255]]
    assert stats.loc[~stats["labeled"], "mask_decodes"].isna().all()  # not applicable, not False

    summary = json.loads((out / "summary.json").read_text())
    assert summary == result.summary
    assert summary["success"] is True and summary["failures"] == []
    assert summary["counts"]["labeled"] == 12 and summary["counts"]["unlabeled"] == 2
    assert summary["counts"]["expected_split_sizes"] == {"train": 8, "val": 2, "test": 2}
    frequency = summary["classes"]["pixel_frequency"]
    assert list(frequency) == CLASSES and sum(frequency.values()) == pytest.approx(1.0)

    index = (out / "data_docs" / "index.html").read_text()
    assert "segflow_data" in index  # the suite's validation result is linked from the site index
    assert list((out / "data_docs" / "validations").rglob("*.html"))
    assert not list(tmp_path.glob(".validated.tmp-*"))


def truncate_image(data: Path) -> None:
    path = data / "images" / "img_3.png"
    path.write_bytes(path.read_bytes()[:200])


def resize_mask(data: Path) -> None:
    write_mask(data / "masks" / "img_4.png", class_mask(4, height=10, width=10))


def out_of_range_mask(data: Path) -> None:
    mask = class_mask(5)
    mask[2, 3] = 7
    write_mask(data / "masks" / "img_5.png", mask)


def unreadable_mask(data: Path) -> None:
    write_image(data / "masks" / "img_6.png", picture(6))  # an RGB picture where an index mask belongs


@pytest.mark.parametrize(
    ("break_data", "check", "named_file", "detail"),
    [
        (truncate_image, "image_decodes", "images/img_3.png", "truncated"),
        (resize_mask, "mask_size_matches_image", "masks/img_4.png", "mask 10x10, image 16x12"),
        (out_of_range_mask, "mask_values_in_range", "masks/img_5.png", "values 7"),
        (unreadable_mask, "mask_decodes", "masks/img_6.png", "mode RGB"),
    ],
)
def test_broken_file_fails_its_check_and_is_named(tmp_path, break_data, check, named_file, detail):
    data = write_dataset(tmp_path / "data", clean_rows())
    break_data(data)
    out = tmp_path / "validated"

    with pytest.raises(ValidationFailed) as raised:
        validate(*sections(), data_dir=data, out_dir=out)

    message = str(raised.value)
    assert f"- {check}: 1 " in message and named_file in message and detail in message
    failures = failed_checks(out)
    assert set(failures) == {check}
    assert failures[check]["paths"] == [named_file]
    assert failures[check]["image_ids"] == [Path(named_file).stem]
    # Outputs are still written so the user can read the report.
    assert (out / "data_docs" / "index.html").exists() and (out / "stats.csv").exists()


def test_image_size_differing_from_manifest_is_caught(tmp_path):
    data = write_dataset(tmp_path / "data", clean_rows())
    manifest = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    manifest.loc[manifest["image_id"] == "img_2", "width"] = "99"
    manifest.to_csv(data / "manifest.csv", index=False)

    with pytest.raises(ValidationFailed, match=r"images/img_2\.png \(16x12, manifest says 99x12\)"):
        validate(*sections(), data_dir=data, out_dir=tmp_path / "out")
    assert set(failed_checks(tmp_path / "out")) == {"image_size_matches_manifest"}


def test_same_picture_in_two_predefined_splits_is_a_leak(tmp_path):
    rows = clean_rows(splits=PREDEFINED)
    rows[7]["image"] = rows[1]["image"].copy()  # img_7 (val) is img_1 (train) again
    data = write_dataset(tmp_path / "data", rows)
    # Re-encoding the copy differently does not hide it: the hash is of decoded pixels.
    Image.fromarray(rows[7]["image"]).save(data / "images" / "img_7.png", compress_level=0)
    out = tmp_path / "out"

    with pytest.raises(ValidationFailed) as raised:
        validate(*sections(), data_dir=data, out_dir=out)

    assert "images/img_1.png (train" in str(raised.value) and "images/img_7.png (val" in str(raised.value)
    failures = failed_checks(out)
    assert set(failures) == {"no_split_leak"}
    assert sorted(failures["no_split_leak"]["image_ids"]) == ["img_1", "img_7"]


def test_a_near_copy_in_test_of_a_training_picture_is_refused_unless_allowed(tmp_path):
    rows = clean_rows(splits=PREDEFINED)
    # img_10 (test) is img_1 (train) mirrored and brighter: other pixels, the same picture.
    rows[10]["image"] = np.clip(np.fliplr(rows[1]["image"]).astype(int) + 12, 0, 255).astype(np.uint8)
    data = write_dataset(tmp_path / "data", rows)
    with pytest.raises(ValidationFailed, match="validate.allow_shared_pictures"):
        validate(*sections(), data_dir=data, out_dir=tmp_path / "refused")
    assert sorted(failed_checks(tmp_path / "refused")["no_near_copy_of_test"]["image_ids"]) == ["img_1", "img_10"]

    result = validate(*sections(allow_shared_pictures=True), data_dir=data, out_dir=tmp_path / "allowed")
    (warning,) = result.summary["warnings"]
    assert warning.startswith("1 picture(s) have copies in more than one predefined split")
    assert "img_1 (train)" in warning and "img_10 (test)" in warning
    assert result.summary["counts"]["distinct_labeled_pictures"] == 11


def test_a_near_copy_in_val_of_a_training_picture_is_only_warned_about(tmp_path):
    # Val chooses and test reports: a validation clip cut from a training sequence (CamVid's) is common.
    rows = clean_rows(splits=PREDEFINED)
    rows[7]["image"] = np.clip(rows[1]["image"].astype(int) - 10, 0, 255).astype(np.uint8)  # img_7 (val) ~ img_1
    result = validate(*sections(), data_dir=write_dataset(tmp_path / "data", rows), out_dir=tmp_path / "out")
    (warning,) = result.summary["warnings"]
    assert warning.startswith("1 picture(s) have copies in more than one predefined split")
    assert "img_1 (train)" in warning and "img_7 (val)" in warning


def test_duplicates_inside_one_predefined_split_are_allowed(tmp_path):
    rows = clean_rows(splits=PREDEFINED)
    rows[2]["image"] = rows[1]["image"].copy()  # both train
    result = validate(*sections(), data_dir=write_dataset(tmp_path / "data", rows), out_dir=tmp_path / "out")
    assert result.summary["counts"]["labeled_per_split"] == {"train": 6, "val": 3, "test": 3}


def test_a_group_by_group_across_predefined_splits_is_warned_about_not_refused(tmp_path):
    data = write_dataset(tmp_path / "data", clean_rows(splits=PREDEFINED))
    # img_1 (train) with img_10 and img_11 (test): one near-copy group in two splits.
    result = validate(*sections(group_by=r"^(img_1)"), data_dir=data, out_dir=tmp_path / "out")
    (warning,) = result.summary["warnings"]
    assert warning.startswith("1 split.group_by group(s) have images in more than one predefined split")
    assert "img_1 (train)" in warning and "img_11 (test)" in warning
    assert result.summary["counts"]["split_groups"] == 10  # 12 pictures, three of them one group


def test_without_predefined_splits_the_minimums_count_groups_not_pictures(tmp_path):
    data = write_dataset(tmp_path / "data", clean_rows())
    validate(*sections(), data_dir=data, out_dir=tmp_path / "ok")
    with pytest.raises(ValidationFailed, match=r"only 1 split group\(s\) of labeled pictures"):
        validate(*sections(group_by=r"^(img)_"), data_dir=data, out_dir=tmp_path / "out")  # every picture one group


def test_too_few_images_in_a_predefined_split(tmp_path):
    splits = ["train"] * 9 + ["val"] * 2 + ["test"] * 1
    data = write_dataset(tmp_path / "data", clean_rows(splits=splits))

    with pytest.raises(ValidationFailed, match="split test has 1 labeled image"):
        validate(*sections(), data_dir=data, out_dir=tmp_path / "out")
    failures = failed_checks(tmp_path / "out")
    assert set(failures) == {"min_test"} and failures["min_test"]["observed"] == 1


def test_unknown_predefined_split_name(tmp_path):
    splits = PREDEFINED[:-1] + ["holdout"]
    data = write_dataset(tmp_path / "data", clean_rows(splits=splits))
    with pytest.raises(ValidationFailed, match=r"images/img_11\.png \(split 'holdout'\)"):
        validate(*sections(), data_dir=data, out_dir=tmp_path / "out")
    assert set(failed_checks(tmp_path / "out")) == {"split_names"}


def test_without_predefined_splits_the_fractions_must_meet_the_minimums(tmp_path):
    rows = clean_rows(n_labeled=8)
    rows[1]["image"] = rows[0]["image"].copy()  # duplicates count once: 7 distinct pictures
    data = write_dataset(tmp_path / "data", rows)

    # 7 pictures at 0.2/0.2 give 5/1/1, short of min_val=min_test=2; 8 would give 4/2/2.
    with pytest.raises(ValidationFailed, match=r"only 7 split group\(s\) of labeled pictures .*8 are needed"):
        validate(*sections(), data_dir=data, out_dir=tmp_path / "out")
    assert set(failed_checks(tmp_path / "out")) == {"enough_labeled"}


def test_no_labeled_image(tmp_path):
    data = write_dataset(tmp_path / "data", clean_rows(n_labeled=0, n_unlabeled=3))
    with pytest.raises(ValidationFailed, match="no image has a mask"):
        validate(*sections(), data_dir=data, out_dir=tmp_path / "out")
    assert set(failed_checks(tmp_path / "out")) == {"any_labeled", "enough_labeled"}


def test_duplicate_image_id(tmp_path):
    rows = clean_rows()
    data = write_dataset(tmp_path / "data", rows)
    with open(data / "manifest.csv", "a", newline="") as f:
        csv.writer(f).writerow(["img_0", "images/unl_0.png", "", 16, 12, ""])
    with pytest.raises(ValidationFailed, match="2 row\\(s\\) share an image_id"):
        validate(*sections(), data_dir=data, out_dir=tmp_path / "out")
    assert set(failed_checks(tmp_path / "out")) == {"image_id_unique"}


def test_many_failures_are_summarised_with_a_count(tmp_path):
    data = write_dataset(tmp_path / "data", clean_rows(n_labeled=30))
    for i in range(25):
        (data / "masks" / f"img_{i}.png").write_bytes(b"not a png")
    with pytest.raises(ValidationFailed) as raised:
        validate(*sections(), data_dir=data, out_dir=tmp_path / "out")
    line = next(row for row in str(raised.value).splitlines() if row.startswith("- mask_decodes"))
    assert line.startswith("- mask_decodes: 25 mask file(s)") and line.endswith("and 20 more.")
    assert len(failed_checks(tmp_path / "out")["mask_decodes"]["image_ids"]) == 20


def test_a_failed_run_replaces_the_previous_output_whole(tmp_path):
    data = write_dataset(tmp_path / "data", clean_rows())
    out = tmp_path / "out"
    validate(*sections(), data_dir=data, out_dir=out)
    truncate_image(data)
    with pytest.raises(ValidationFailed):
        validate(*sections(), data_dir=data, out_dir=out)
    assert json.loads((out / "summary.json").read_text())["success"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]


@pytest.mark.parametrize("out", ["data", "data/report", "."])
def test_a_report_folder_that_is_inside_or_holds_the_data_is_refused_and_the_data_kept(tmp_path, out):
    data = write_dataset(tmp_path / "data", clean_rows())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SegflowError, match="segflow validate: the output folder .* the input"):
        validate(*sections(), data_dir=data, out_dir=tmp_path / out)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("override", "named"),
    [({"val_fraction": 0.0}, "val_fraction"), ({"test_fraction": 0.9}, "test_fraction"), ({"min_val": -1}, "min_val")],
)
def test_bad_parameters_are_named(tmp_path, override, named):
    data = write_dataset(tmp_path / "data", clean_rows(n_labeled=1, n_unlabeled=0))
    with pytest.raises(SegflowError, match=named):
        validate(*sections(**override), data_dir=data, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_split_stage_reads_the_stats_written_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths, as dvc.yaml passes them
    rows = clean_rows(n_labeled=15)
    rows[9]["image"] = rows[8]["image"].copy()
    data = write_dataset(Path("data"), rows)
    validate(*sections(), data_dir=data, out_dir=Path("out"))
    assert Path("out/data_docs/index.html").exists()

    splits = make_splits(
        data, Path("out/stats.csv"), Path("splits.csv"), seed=0, val_fraction=0.2, test_fraction=0.2
    ).set_index("image_id")["split"]
    assert splits["img_8"] == splits["img_9"]
    assert (splits[["unl_0", "unl_1"]] == "unlabeled").all()
    # 14 distinct pictures at 0.2/0.2 -> 8/3/3 groups; img_9 rides along with img_8.
    assert splits.drop("img_9").value_counts().to_dict() == {"train": 8, "val": 3, "test": 3, "unlabeled": 2}


def test_masks_that_are_all_ignore_fail_from_the_command_line_naming_the_figures_and_the_keys(tmp_path):
    rows = clean_rows()
    for row in rows[:12]:
        row["mask"] = np.full_like(row["mask"], 255)
    write_dataset(tmp_path / "data", rows)
    (tmp_path / "params.yaml").write_text("validate: {min_train: 2, min_labeled_pixel_fraction: 0.05}\n")

    result = subprocess.run([str(Path(sys.executable).parent / "segflow"), "validate", "data", "--out", "out"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert ("- labeled_pixel_fraction: the masks are on average 0.0% labeled pixels (the rest is ignore 255), "
            "below validate.min_labeled_pixel_fraction=0.05") in result.stderr  # the value params.yaml sets
    assert "- foreground_image_fraction: 0.0% of the labeled images" in result.stderr
    assert set(failed_checks(tmp_path / "out")) == {"labeled_pixel_fraction", "foreground_image_fraction"}


def test_labeled_pixel_fraction_is_the_mean_over_labeled_masks(tmp_path):
    rows = clean_rows()
    for row in rows[:12]:
        row["mask"][:6] = 255  # the top half of every mask ignored (with the ignored pixel at [0, 0])
    data = write_dataset(tmp_path / "data", rows)
    figure = 0.5

    validate(*sections(min_labeled_pixel_fraction=figure), data_dir=data, out_dir=tmp_path / "out")
    with pytest.raises(ValidationFailed, match=f"on average {figure:.1%} labeled pixels"):
        validate(*sections(min_labeled_pixel_fraction=figure + 0.001), data_dir=data, out_dir=tmp_path / "out")
    stats = pd.read_csv(tmp_path / "out" / "stats.csv")
    assert stats.loc[stats["labeled"], "labeled_pixel_fraction"].to_numpy() == pytest.approx(figure)
    assert stats.loc[~stats["labeled"], "labeled_pixel_fraction"].isna().all()  # unlabeled rows do not count


def test_an_empty_coco_annotation_list_leaves_nothing_to_learn(tmp_path):
    (tmp_path / "images").mkdir()
    images = []
    for i in range(12):
        write_image(tmp_path / "images" / f"img_{i}.png", picture(i))
        images.append({"id": i, "file_name": f"img_{i}.png", "width": 16, "height": 12})
    coco = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "cat"}]}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    ingest_coco(tmp_path / "images", tmp_path / "annotations.json", tmp_path / "ingested")

    with pytest.raises(ValidationFailed) as raised:
        validate(*sections(), data_dir=tmp_path / "ingested", out_dir=tmp_path / "out")

    assert ("0.0% of the labeled images show a class other than class 0 'background', below "
            "validate.min_foreground_image_fraction=0.1") in str(raised.value)
    assert set(failed_checks(tmp_path / "out")) == {"foreground_image_fraction"}


def test_a_few_images_with_foreground_are_enough(tmp_path):
    rows = clean_rows()
    for row in rows[2:12]:
        row["mask"] = np.zeros_like(row["mask"])  # background only: 2 of 12 images show a class
    data = write_dataset(tmp_path / "data", rows)
    validate(*sections(min_foreground_image_fraction=2 / 12), data_dir=data, out_dir=tmp_path / "out")
    with pytest.raises(ValidationFailed, match=r"16\.7% of the labeled images"):
        validate(*sections(min_foreground_image_fraction=0.2), data_dir=data, out_dir=tmp_path / "out")
