"""What derived state was built from, as SHA-256 hashes of files: state built from other files is refused,
naming the files that differ (the decoded-image cache, a training's resume checkpoint)."""

from __future__ import annotations

import csv
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def file_sha256(path: Path | str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def files_sha256(files: dict[str, Path]) -> dict[str, str]:
    """SHA-256 of each file, by the name given."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        return dict(zip(files, pool.map(file_sha256, files.values())))


def folder_sha256(folder: Path | str) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by path relative to it (POSIX), sorted."""
    folder = Path(folder)
    return files_sha256({path.relative_to(folder).as_posix(): path
                         for path in sorted(folder.rglob("*")) if path.is_file()})


def ingested_sha256(data_dir: Path | str) -> dict[str, str]:
    """SHA-256 of an ingested folder's manifest, class list and every image and mask the manifest lists (images
    may lie outside the folder), by their path in the manifest."""
    data_dir = Path(data_dir)
    with open(data_dir / "manifest.csv", newline="") as file:
        listed = [row[key] for row in csv.DictReader(file) for key in ("image_path", "mask_path") if row.get(key)]
    names = ["manifest.csv", *(["classes.json"] if (data_dir / "classes.json").exists() else []), *listed]
    return files_sha256({name: data_dir / name for name in names})


def differences(then: dict[str, str], now: dict[str, str], shown: int = 3) -> str:
    """The files that differ between two :func:`folder_sha256` results, in words ("" when none)."""
    parts = []
    for what, names in (("changed", sorted(k for k in then.keys() & now.keys() if then[k] != now[k])),
                        ("added", sorted(now.keys() - then.keys())), ("removed", sorted(then.keys() - now.keys()))):
        if names:
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            parts.append(f"{what} {', '.join(names[:shown])}{more}")
    return "; ".join(parts)
