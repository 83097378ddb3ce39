"""Atomic outputs: a stage either replaces its output whole or leaves the previous one untouched."""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from segflow.errors import SegflowError

# In every folder that a user names as an output and segflow writes whole: only such a folder is replaced.
OUTPUT_MARKER = ".segflow-output"


@contextlib.contextmanager
def atomic_dir(out: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; outputs should look like any other folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def refuse_overlap(out: Path | str, inputs: Iterable[Path | str | None], command: str) -> None:
    """Refuse an output folder that is, contains or lies inside one of ``inputs``: replacing it whole would
    delete the input, or the input would read its own output."""
    final = Path(out).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if final == source or final in source.parents or source in final.parents:
            relation = "is" if final == source else "contains" if final in source.parents else "lies inside"
            raise SegflowError(
                f"{command}: the output folder {out} {relation} the input {given}: writing it (it is replaced "
                "whole) would delete the input or mix with it. Choose an output folder apart from the inputs.")


@contextlib.contextmanager
def owned_dir(out: Path | str, command: str, inputs: Iterable[Path | str | None] = ()) -> Iterator[Path]:
    """:func:`atomic_dir` for a folder the user names: refused when it overlaps ``inputs`` or when it exists,
    is not empty and was not written by segflow (no :data:`OUTPUT_MARKER`), so that no user folder, a git
    checkout say, is ever replaced. The marker goes into the new folder."""
    out = Path(out)
    refuse_overlap(out, inputs, command)
    if out.exists() and not (out / OUTPUT_MARKER).exists() and (not out.is_dir() or any(out.iterdir())):
        raise SegflowError(
            f"{command}: {out} exists and was not written by segflow (it holds no {OUTPUT_MARKER} file); the "
            "output folder is replaced whole, so it must be new, empty or an earlier output. Choose another "
            "folder, or empty or remove this one yourself.")
    with atomic_dir(out) as staging:
        (staging / OUTPUT_MARKER).write_text("Written by segflow, which replaces this folder whole when it runs again.\n")
        yield staging


@contextlib.contextmanager
def exclusive_lock(path: Path | str, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) while ``what`` runs; refused at once, naming the
    holder, when another process holds it. The kernel releases it when the holder dies, so none goes stale.

    A POSIX record lock (``lockf``), not ``flock``: it belongs to this process alone, so forked children (the
    DataLoader's workers) do not keep it held after the holder is killed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as file:
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0, os.SEEK_SET)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            file.seek(0)
            holder = file.read().strip() or "another process"
            raise SegflowError(
                f"{path}: {what} is already running ({holder}). Wait for it to finish, or stop it, then run this "
                "again.") from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n")
        file.flush()
        yield


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "w", **open_args: Any) -> Iterator[IO]:
    """Write to a temporary sibling of ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Standard JSON only: NaN and Infinity are refused (ValueError naming the key), never written. An undefined
    number is the caller's to write as None (null) or to refuse with a reason."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError:
        where = _non_finite_key(obj)
        if where is None:  # another ValueError (a circular reference)
            raise
        raise ValueError(f"{path}: not written: {where} is NaN or infinite, which JSON cannot hold.") from None
    atomic_write_text(path, text + "\n")


def _non_finite_key(obj: Any, key: str = "") -> str | None:
    """The dotted key of the first NaN or infinite float in ``obj`` (``per_class_iou.car``, ``history.0.loss``)."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else key or "the value"
    children = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for child, value in children:
        found = _non_finite_key(value, f"{key}.{child}" if key else str(child))
        if found is not None:
            return found
    return None


def csv_text(header: list[str], rows: list[list[object]]) -> str:
    """A CSV table as text (``\n`` line ends, as the DVC plot tables are read)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
