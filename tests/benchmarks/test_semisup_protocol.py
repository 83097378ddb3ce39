"""benchmarks/semisup_camvid.py's target-domain protocol: its frame lists never overlap, and no training frame
comes from the sequence it is scored on."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from semisup_camvid import target_frames, write_target_splits

# CamVid's test split: Seq05VD every 30th frame from f00000 to f05100, and 62 frames of 0001TP.
TEST_IDS = [f"Seq05VD_f{n:05d}" for n in range(0, 5101, 30)] + [f"0001TP_{n:06d}" for n in range(8550, 8550 + 62 * 30, 30)]
TRAIN_IDS = [f"0016E5_{n:05d}" for n in range(0, 600, 30)] + [f"0001TP_{n:06d}" for n in range(6690, 6990, 30)]


def test_target_frame_lists_are_disjoint_and_cut_the_sequence_in_two():
    frames = target_frames(TEST_IDS)
    sizes = {name: len(ids) for name, ids in frames.items()}
    assert sizes == {"val": 10, "unlabeled": 75, "target_test": 86, "source_test": 62}
    every = [i for ids in frames.values() for i in ids]
    assert len(every) == len(set(every)) == len(TEST_IDS)
    number = {i: int(i.split("_f")[1]) for i in every if i.startswith("Seq05VD")}
    assert max(number[i] for i in frames["val"] + frames["unlabeled"]) == 2520
    assert min(number[i] for i in frames["target_test"]) == 2550
    assert [number[i] for i in (frames["val"][0], frames["val"][-1])] == [0, 2520]  # spread over the whole half
    assert all(i.startswith("0001TP") for i in frames["source_test"])


def test_target_splits_give_every_frame_one_split_and_the_oracle_the_unlabeled_masks(tmp_path):
    val_ids = [f"0016E5_{n:05d}" for n in range(7000, 7300, 30)]
    manifest = pd.DataFrame({"image_id": TRAIN_IDS + val_ids + TEST_IDS, "image_path": "x.png", "mask_path": "m.png",
                             "width": 128, "height": 96,
                             "split": ["train"] * len(TRAIN_IDS) + ["val"] * len(val_ids) + ["test"] * len(TEST_IDS)})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    for oracle in (False, True):
        frames = write_target_splits(tmp_path, tmp_path / "splits.csv", oracle=oracle)
        splits = pd.read_csv(tmp_path / "splits.csv").set_index("image_id")["split"]
        assert list(splits.index) == list(manifest["image_id"])
        train = set(splits[splits == "train"].index)
        assert train == set(TRAIN_IDS) | (set(frames["unlabeled"]) if oracle else set())
        assert not any(i.startswith("Seq05VD") for i in train - set(frames["unlabeled"]))
        assert set(splits[splits == "unused"].index) == set(val_ids)  # CamVid's val plays no part
        for name in ("val", "target_test", "source_test"):
            assert set(splits[splits == name].index) == set(frames[name])
        assert set(splits[splits == "unlabeled"].index) == (set() if oracle else set(frames["unlabeled"]))
