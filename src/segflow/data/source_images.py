"""The image files of a raw data source: which files under a folder are images, the one symbolic-link policy for
every file read as data, the image ids they get, and the warning that names files left out.

Folders are searched recursively for png/jpg/jpeg/bmp/tif/tiff; hidden files and folders (such as macOS ``._*``
files) are skipped. ``image_id`` is the file name without extension, with characters other than letters, digits,
``.``, ``_`` and ``-`` replaced by ``_``; two images that would share an id (compared case-insensitively, since
masks named by id would overwrite each other on case-insensitive filesystems) are an error naming both files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from segflow.errors import SegflowError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MAX_NAMED_FILES = 20  # a warning names at most this many files, then gives a count
DVC_CACHE = Path(".dvc/cache")  # in the project folder: DVC's symlink and hardlink cache types link files there


class ImageIds:
    """Hands out filesystem-safe image ids and refuses two files that would share one."""

    def __init__(self) -> None:
        self._owners: dict[str, Path] = {}

    def assign(self, image: Path) -> str:
        image_id = re.sub(r"[^A-Za-z0-9._-]", "_", image.stem)
        if image_id.startswith("."):  # a leading dot would hide the mask file
            image_id = "_" + image_id[1:]
        owner = self._owners.get(image_id.casefold())
        if owner is not None:
            raise SegflowError(
                f"{owner} and {image} would both get image id {image_id!r} (the file name without extension, "
                "made filesystem safe; ids must differ in more than letter case). Rename one of them."
            )
        self._owners[image_id.casefold()] = image
        return image_id


def refuse_link_outside(path: Path, folder: Path, what: str) -> None:
    """The one symbolic-link policy for every file read as data: ``path`` (listed under ``folder``) may be or pass
    through a link only if where it ends up lies inside ``folder`` itself or in the project's DVC cache (DVC's
    symlink cache type links every tracked file there). A link elsewhere (``zzz.png -> /etc/shadow``) would make
    segflow read a file DVC does not track, or one the data's author should not get to read."""
    target, inside = path.resolve(), [Path(folder).resolve(), DVC_CACHE.resolve()]
    if not any(target.is_relative_to(root) for root in inside):
        raise SegflowError(
            f"{path}: a symbolic link (itself or a folder on its way) to {target}, outside the {what} folder "
            f"{folder} and the project's DVC cache. Data is read only from inside its folder: copy the file in, "
            "or point the data settings at the folder that holds it.")


def list_images(folder: Path, what: str, skipped: Iterable[Path] = ()) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), leaving out hidden entries and ``skipped`` folders; a
    link out of ``folder`` is refused (:func:`refuse_link_outside`)."""
    if not folder.is_dir():
        raise SegflowError(f"{folder}: {what} folder not found (or not a folder).")
    skipped = [path.resolve() for path in skipped]
    resolved_folder = folder.resolve()
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.suffix.lower() not in IMAGE_EXTENSIONS or any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and not any((resolved_folder / relative).is_relative_to(skip) for skip in skipped):
            refuse_link_outside(path, folder, what)
            found.append(path)
    return sorted(found)


def files_warning(files: Sequence[Any], problem: str) -> str:
    """``"3 <problem>: a, b, c"``, naming at most MAX_NAMED_FILES of them."""
    named = ", ".join(str(name) for name in files[:MAX_NAMED_FILES])
    more = f" and {len(files) - MAX_NAMED_FILES} more" if len(files) > MAX_NAMED_FILES else ""
    return f"{len(files)} {problem} and are left out: {named}{more}."
