"""Near-copies: does registration group a labeling tool's augmented copies, and what does it merge on real video?

    python benchmarks/near_copies.py [--camvid ../shared/datasets/camvid] [--scenes 128]

1. The default data (``--scenes`` labeled scenes of ``segflow synth``) exported three times per scene as a
   labeling tool exports (tests/data/test_near_copies.py: flip, crop up to 10%, rotation up to 5 degrees,
   brightness, contrast, blur, noise, JPEG): the correlation of the registered thumbnails of every proposed pair,
   copies against different scenes, and the share of scenes whose three copies end in one group.
2. CamVid's 701 frames (train, val, test; one frame a second of five drives): the groups formed at each
   threshold, and how many linked pairs cross a split or a sequence (a car waiting at a light films near-copies;
   a link across sequences is a false one).

Writes ``reports/near_copies.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "data"))
from test_near_copies import exported_copy  # noqa: E402 - the exports the test groups

from segflow.config import parse_params  # noqa: E402
from segflow.data.imageio import read_image  # noqa: E402
from segflow.data.near_copies import picture_groups, scored_pairs, thumbnail  # noqa: E402
from segflow.stages.synth import generate  # noqa: E402

THRESHOLDS = (0.9, 0.93, 0.95, 0.97, 0.98)
DEFAULT = parse_params({}).split.near_copy_similarity


def exported_scenes(count: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), seed=0, num_labeled=count, num_unlabeled=0)
        thumbnails, scene = [], []
        for number, path in enumerate(sorted((Path(tmp) / "images").glob("*.png"))):
            for copy in range(3):
                exported_copy(read_image(path), copy, seed=1).save(jpeg := Path(tmp) / "copy.jpg", quality=90)
                thumbnails.append(thumbnail(read_image(jpeg)))
                scene.append(number)
    started = time.perf_counter()
    scored = scored_pairs(thumbnails)
    seconds = time.perf_counter() - started
    scene = np.array(scene)
    copies = [s for i, j, s in scored if scene[i] == scene[j]]
    others = [s for i, j, s in scored if scene[i] != scene[j]]
    proposed_copies = {(i, j) for i, j, _ in scored if scene[i] == scene[j]}
    all_copies = 3 * count  # three pairs per scene
    groups = np.array(picture_groups([], len(scene), [(i, j) for i, j, s in scored if s >= DEFAULT]))
    whole = float(np.mean([len(set(groups[scene == n])) == 1 for n in range(count)]))
    merged = sum(len(set(scene[groups == g])) > 1 for g in set(groups))
    return {"images": len(scene), "scenes": count, "seconds": round(seconds, 1),
            "copy_pairs_proposed": f"{len(proposed_copies)} of {all_copies}",
            "copies_similarity_min": round(min(copies), 4), "copies_similarity_p5": round(float(np.percentile(copies, 5)), 4),
            "other_pairs_proposed": len(others), "others_similarity_max": round(max(others), 4) if others else None,
            f"scenes_whole_at_{DEFAULT}": whole, f"groups_with_two_scenes_at_{DEFAULT}": int(merged)}


def camvid(root: Path) -> dict:
    files = [(split, path) for split in ("train", "val", "test") for path in sorted((root / split).glob("*.png"))]
    thumbnails = [thumbnail(read_image(path)) for _, path in files]
    started = time.perf_counter()
    scored = scored_pairs(thumbnails)
    seconds = time.perf_counter() - started
    split = [s for s, _ in files]
    sequence = [path.stem.split("_")[0] for _, path in files]
    rows = []
    for threshold in THRESHOLDS:
        pairs = [(i, j) for i, j, s in scored if s >= threshold]
        groups = picture_groups([], len(files), pairs)
        sizes = np.bincount(groups)
        rows.append({"threshold": threshold, "linked_pairs": len(pairs), "groups": len(sizes),
                     "largest_group": int(sizes.max()),
                     "pairs_across_splits": sum(split[i] != split[j] for i, j in pairs),
                     "pairs_across_sequences": sum(sequence[i] != sequence[j] for i, j in pairs),
                     "groups_across_splits": sum(len({split[k] for k in np.flatnonzero(np.array(groups) == g)}) > 1
                                                 for g in range(len(sizes)))})
    names = [f"{split[k]}/{path.name}" for k, (_, path) in enumerate(files)]
    crossing = [f"{names[i]} ~ {names[j]} ({s:.3f})" for i, j, s in scored if s >= DEFAULT and split[i] != split[j]]
    return {"frames": len(files), "proposed_pairs": len(scored), "seconds": round(seconds, 1), "thresholds": rows,
            f"pairs_across_splits_at_{DEFAULT}": crossing}


def markdown(result: dict) -> str:
    s = result["synthetic"]
    lines = ["# Near-copies: registration of the thumbnails", "",
             f"`python benchmarks/near_copies.py` (default `split.near_copy_similarity`: {DEFAULT}).", "",
             f"## A labeling tool's export of the default data ({s['scenes']} scenes x 3 copies)", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in s.items()], ""]
    if "camvid" in result:
        c = result["camvid"]
        lines += [f"## CamVid ({c['frames']} frames, {c['proposed_pairs']} proposed pairs, {c['seconds']} s)", "",
                  "| threshold | linked pairs | groups | largest | pairs across splits | across sequences | "
                  "groups across splits |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['threshold']} | {r['linked_pairs']} | {r['groups']} | {r['largest_group']} | "
                  f"{r['pairs_across_splits']} | {r['pairs_across_sequences']} | {r['groups_across_splits']} |"
                  for r in c["thresholds"]]
        lines += ["", f"Pairs across splits at {DEFAULT}: " + ("; ".join(c[f"pairs_across_splits_at_{DEFAULT}"]) or "none")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--camvid", type=Path, default=REPO.parent / "shared" / "datasets" / "camvid")
    parser.add_argument("--scenes", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "near_copies")
    args = parser.parse_args()
    result = {"synthetic": exported_scenes(args.scenes)}
    if args.camvid.is_dir():
        result["camvid"] = camvid(args.camvid)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
