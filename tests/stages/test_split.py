"""Split stage: reproducible, stratified on class presence, duplicates together, predefined splits kept.

The fixtures write ``manifest.csv`` and the validate stage's ``stats.csv`` directly (no images), so
these tests exercise the split logic alone; test_validate.py runs the two stages together.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from segflow.errors import SegflowError
from segflow.stages.split import expected_split_sizes, make_splits

N_CLASSES = 4


def write_inputs(root: Path, images: list[dict]) -> tuple[Path, Path]:
    """Each image: image_id, classes (indices present; None = unlabeled), optional hash and split."""
    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    manifest = pd.DataFrame(
        {
            "image_id": [i["image_id"] for i in images],
            "image_path": [f"images/{i['image_id']}.png" for i in images],
            "mask_path": ["" if i["classes"] is None else f"masks/{i['image_id']}.png" for i in images],
            "width": 8,
            "height": 8,
            "split": [i.get("split", "") for i in images],
        }
    )
    manifest.to_csv(data_dir / "manifest.csv", index=False)
    stats = pd.DataFrame(
        {
            "image_id": manifest["image_id"],
            "labeled": manifest["mask_path"] != "",
            "content_hash": [i.get("hash", f"hash-{i['image_id']}") for i in images],
            "near_copy_group": [i.get("near_copy_group", "") for i in images],
            **{
                f"px_{k}": [None if i["classes"] is None else (10 if k in i["classes"] else 0) for i in images]
                for k in range(N_CLASSES)
            },
            "px_ignore": 0,
        }
    )
    stats_csv = root / "validated" / "stats.csv"
    stats_csv.parent.mkdir()
    stats.to_csv(stats_csv, index=False)
    return data_dir, stats_csv


def rare_class_images(n: int = 30, n_rare: int = 9) -> list[dict]:
    """Background everywhere, classes 1/2 alternating, class 3 in ``n_rare`` images spread over the list."""
    rare = set(range(0, n, n // n_rare)[:n_rare])
    return [
        {"image_id": f"img_{i:02d}", "classes": [0, 1 + i % 2] + ([3] if i in rare else [])} for i in range(n)
    ]


def split_of(result: pd.DataFrame) -> pd.Series:
    return result.set_index("image_id")["split"]


def test_same_seed_gives_the_identical_file(tmp_path):
    data, stats = write_inputs(tmp_path, rare_class_images())
    first = make_splits(data, stats, tmp_path / "a.csv", seed=3, val_fraction=0.2, test_fraction=0.2)
    make_splits(data, stats, tmp_path / "b.csv", seed=3, val_fraction=0.2, test_fraction=0.2)

    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    written = pd.read_csv(tmp_path / "a.csv", dtype=str)
    assert list(written.columns) == ["image_id", "split"]
    pd.testing.assert_frame_equal(written, first.astype(str))
    assert first["split"].value_counts().to_dict() == {"train": 18, "val": 6, "test": 6}


def test_another_seed_gives_another_assignment(tmp_path):
    data, stats = write_inputs(tmp_path, rare_class_images())
    runs = [
        split_of(make_splits(data, stats, tmp_path / f"{seed}.csv", seed=seed, val_fraction=0.2, test_fraction=0.2))
        for seed in (0, 1)
    ]
    assert not runs[0].equals(runs[1])
    assert runs[0].value_counts().to_dict() == runs[1].value_counts().to_dict()  # sizes do not depend on the seed


@pytest.mark.parametrize("seed", range(10))
def test_a_rare_class_reaches_every_split(tmp_path, seed):
    # Random 18/6/6 splits would leave class 3 (9 of 30 images) out of val or test about 1 time in 6.
    images = rare_class_images()
    data, stats = write_inputs(tmp_path, images)
    splits = split_of(make_splits(data, stats, tmp_path / "s.csv", seed=seed, val_fraction=0.2, test_fraction=0.2))

    rare_ids = [i["image_id"] for i in images if 3 in i["classes"]]
    per_split = splits[rare_ids].value_counts()
    # Proportional shares are 5.4 / 1.8 / 1.8 images.
    assert per_split.get("val", 0) >= 1 and per_split.get("test", 0) >= 1
    assert abs(per_split.get("train", 0) - 5.4) <= 1


def test_exact_duplicates_share_a_split(tmp_path):
    images = rare_class_images()
    for i in range(0, 30, 3):  # groups of three images with the same pixels
        for j in (i, i + 1, i + 2):
            images[j]["hash"] = f"same-{i}"
            images[j]["classes"] = images[i]["classes"]
    data, stats = write_inputs(tmp_path, images)

    for seed in range(5):
        splits = split_of(make_splits(data, stats, tmp_path / "s.csv", seed=seed, val_fraction=0.2, test_fraction=0.2))
        groups = pd.Series([image["hash"] for image in images], index=splits.index)
        assert (splits.groupby(groups).nunique() == 1).all()
        # 10 groups -> 6/2/2 groups of three images.
        assert splits.value_counts().to_dict() == {"train": 18, "val": 6, "test": 6}


def test_the_validate_stages_near_copy_groups_share_a_split(tmp_path):
    images = rare_class_images()
    pictures = pd.Series([i // 3 for i in range(30)])  # ten pictures, three copies each
    grouped = split_of(make_splits(*write_inputs(tmp_path / "g", [{**image, "near_copy_group": picture}
                                                                for image, picture in zip(images, pictures)]),
                                   tmp_path / "g.csv", seed=0, val_fraction=0.2, test_fraction=0.2))
    assert (grouped.groupby(pictures.to_numpy()).nunique() == 1).all()
    assert grouped.value_counts().to_dict() == {"train": 18, "val": 6, "test": 6}
    ungrouped = split_of(make_splits(*write_inputs(tmp_path / "u", images), tmp_path / "u.csv", seed=0,
                                     val_fraction=0.2, test_fraction=0.2))
    assert (ungrouped.groupby(pictures.to_numpy()).nunique() > 1).any()


def test_predefined_splits_are_kept_and_unlabeled_rows_marked(tmp_path):
    images = [
        {"image_id": "a", "classes": [0], "split": "val"},
        {"image_id": "b", "classes": [0, 1], "split": "train"},
        {"image_id": "c", "classes": None, "split": ""},
        {"image_id": "d", "classes": [1], "split": "test"},
        {"image_id": "e", "classes": [0], "split": "train"},
    ]
    data, stats = write_inputs(tmp_path, images)
    result = make_splits(data, stats, tmp_path / "s.csv", seed=0, val_fraction=0.2, test_fraction=0.2,
                         summary_json=tmp_path / "split.json")
    assert result.values.tolist() == [["a", "val"], ["b", "train"], ["c", "unlabeled"], ["d", "test"], ["e", "train"]]
    assert json.loads((tmp_path / "split.json").read_text()) == {
        "images": {"train": 2, "val": 1, "test": 1, "unlabeled": 1},
        "test_images_with_a_near_copy_in_training": 0, "test_images": 1}


def test_the_summary_counts_the_test_images_a_predefined_split_shares_with_training(tmp_path):
    images = [{"image_id": "a", "classes": [0], "split": "val", "near_copy_group": 0},  # a and d: val and test
              {"image_id": "b", "classes": [0, 1], "split": "train", "near_copy_group": 1},
              {"image_id": "c", "classes": [1], "split": "test", "near_copy_group": 1},  # b's near-copy
              {"image_id": "d", "classes": [1], "split": "test", "near_copy_group": 0},
              {"image_id": "e", "classes": [0], "split": "test", "hash": "hash-b"}]  # b's pixels
    data, stats = write_inputs(tmp_path, images)
    make_splits(data, stats, tmp_path / "s.csv", seed=0, val_fraction=0.2, test_fraction=0.2,
                summary_json=tmp_path / "split.json")
    summary = json.loads((tmp_path / "split.json").read_text())
    assert summary["test_images_with_a_near_copy_in_training"] == 2 and summary["test_images"] == 3


def test_unlabeled_rows_keep_manifest_order_without_predefined_splits(tmp_path):
    images = rare_class_images(n=10, n_rare=2)
    images.insert(4, {"image_id": "unl", "classes": None})
    data, stats = write_inputs(tmp_path, images)
    result = make_splits(data, stats, tmp_path / "s.csv", seed=0, val_fraction=0.2, test_fraction=0.2)
    assert result["image_id"].tolist() == [i["image_id"] for i in images]
    assert split_of(result)["unl"] == "unlabeled"


def test_three_labeled_pictures_give_one_per_split(tmp_path):
    data, stats = write_inputs(tmp_path, rare_class_images(n=3, n_rare=1))
    result = make_splits(data, stats, tmp_path / "s.csv", seed=0, val_fraction=0.05, test_fraction=0.05)
    assert sorted(result["split"]) == ["test", "train", "val"]


@pytest.mark.parametrize("n_groups", [0, 1, 2, 3, 4, 7, 10, 101])
@pytest.mark.parametrize(("val_fraction", "test_fraction"), [(0.05, 0.05), (0.15, 0.2), (0.45, 0.45), (0.1, 0.85)])
def test_expected_split_sizes_cover_every_group(n_groups, val_fraction, test_fraction):
    sizes = expected_split_sizes(n_groups, val_fraction, test_fraction)
    assert sum(sizes.values()) == n_groups and min(sizes.values()) >= 0
    if n_groups >= 3:
        assert min(sizes.values()) >= 1
    elif n_groups:
        assert sizes["train"] >= 1


@pytest.mark.parametrize(
    ("val_fraction", "test_fraction", "named"),
    [
        (0.0, 0.2, "val_fraction"),
        (0.2, -0.1, "test_fraction"),
        (0.2, float("nan"), "test_fraction"),
        (1.5, 0.2, "val_fraction"),
        (0.6, 0.4, "val_fraction \\+ split.test_fraction"),
    ],
)
def test_bad_fractions_are_named(tmp_path, val_fraction, test_fraction, named):
    data, stats = write_inputs(tmp_path, rare_class_images(n=6, n_rare=2))
    with pytest.raises(SegflowError, match=named):
        make_splits(data, stats, tmp_path / "s.csv", seed=0, val_fraction=val_fraction, test_fraction=test_fraction)
    assert not (tmp_path / "s.csv").exists()


def test_stale_stats_are_reported(tmp_path):
    data, stats = write_inputs(tmp_path, rare_class_images(n=6, n_rare=2))
    table = pd.read_csv(stats)
    table[table["image_id"] != "img_04"].to_csv(stats, index=False)
    with pytest.raises(SegflowError, match="img_04.*re-run the validate stage"):
        make_splits(data, stats, tmp_path / "s.csv", seed=0, val_fraction=0.2, test_fraction=0.2)


def test_labeled_fraction_hides_the_rest_of_train_and_leaves_val_and_test_alone(tmp_path):
    data, stats = write_inputs(tmp_path, rare_class_images(n=40, n_rare=8))
    full = split_of(make_splits(data, stats, tmp_path / "full.csv", seed=1, val_fraction=0.2, test_fraction=0.2))
    semi = split_of(make_splits(data, stats, tmp_path / "semi.csv", seed=1, val_fraction=0.2, test_fraction=0.2,
                                labeled_fraction=0.125))
    assert (semi[full != "train"] == full[full != "train"]).all()
    assert (semi == "train").sum() == 3  # 24 training images * 1/8
    assert set(semi[full == "train"]) == {"train", "unlabeled"}
    again = make_splits(data, stats, tmp_path / "again.csv", seed=1, val_fraction=0.2, test_fraction=0.2,
                        labeled_fraction=0.125)
    assert (tmp_path / "again.csv").read_bytes() == (tmp_path / "semi.csv").read_bytes()
    assert split_of(again).equals(semi)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_by_keeps_every_near_copy_group_in_one_split(tmp_path, seed):
    # 12 photos x 3 copies (NAME_copyC), a rare class in 4 photos.
    images = [{"image_id": f"photo{p:02d}_copy{c}", "classes": [0, 1 + p % 2] + ([3] if p % 3 == 0 else [])}
              for p in range(12) for c in "abc"]
    data, stats = write_inputs(tmp_path / "regex", images)
    splits = split_of(make_splits(data, stats, tmp_path / "s.csv", seed=seed, val_fraction=0.2, test_fraction=0.2,
                                  group_by=r"^(.+)_copy"))
    by_photo = splits.groupby(splits.index.str.slice(0, 7)).nunique()
    assert (by_photo == 1).all() and len(by_photo) == 12
    assert set(splits) == {"train", "val", "test"}
    ungrouped = split_of(make_splits(data, stats, tmp_path / "u.csv", seed=seed, val_fraction=0.2, test_fraction=0.2))
    assert (ungrouped.groupby(ungrouped.index.str.slice(0, 7)).nunique() > 1).any()  # what group_by prevents

    # A labeling tool's export (Roboflow: NAME_jpg.rf.HASH.jpg) needs no group_by: its names group it.
    exported = [{**image, "image_id": image["image_id"].replace("_copy", "_jpg.rf.")} for image in images]
    data, stats = write_inputs(tmp_path / "export", exported)
    splits = split_of(make_splits(data, stats, tmp_path / "e.csv", seed=seed, val_fraction=0.2, test_fraction=0.2))
    assert (splits.groupby(splits.index.str.slice(0, 7)).nunique() == 1).all()

    # The same groups from a manifest column (a video's sequence, say).
    data, stats = write_inputs(tmp_path / "column", images)
    manifest = pd.read_csv(data / "manifest.csv")
    manifest["sequence"] = manifest["image_id"].str.slice(0, 7)
    manifest.to_csv(data / "manifest.csv", index=False)
    by_column = split_of(make_splits(data, stats, tmp_path / "c.csv", seed=seed, val_fraction=0.2,
                                     test_fraction=0.2, group_by="column:sequence"))
    assert (by_column.groupby(manifest.set_index("image_id")["sequence"]).nunique() == 1).all()


def test_a_duplicate_joins_its_copys_whole_group(tmp_path):
    images = [{"image_id": f"seq{s}_{f}", "classes": [0, 1], "hash": f"h{s}{f}"} for s in range(6) for f in range(3)]
    images[0]["hash"] = images[5]["hash"]  # seq0_0 has the pixels of seq1_2: sequences 0 and 1 are one group
    data, stats = write_inputs(tmp_path, images)
    splits = split_of(make_splits(data, stats, tmp_path / "s.csv", seed=0, val_fraction=0.2, test_fraction=0.2,
                                  group_by=r"^(seq\d)_"))
    assert splits.loc[[f"seq{s}_{f}" for s in (0, 1) for f in range(3)]].nunique() == 1


def test_group_by_a_column_the_manifest_lacks_names_it(tmp_path):
    data, stats = write_inputs(tmp_path, rare_class_images())
    with pytest.raises(SegflowError, match="split.group_by names the column 'sequence'"):
        make_splits(data, stats, tmp_path / "s.csv", seed=0, val_fraction=0.2, test_fraction=0.2,
                    group_by="column:sequence")
