"""Writes that a crash, a kill or a full disk cannot leave half done: a reader finds the old version
or the new one, never a mix, and never nothing.

A file is written beside its target as NAME.tmp, flushed to disk, then renamed over the target (a
rename within one folder is atomic on POSIX and Windows).

A folder (a model folder such as `best/`) cannot be renamed over a folder that holds files, so it is
swapped in two renames:

    write NAME.tmp  ->  rename NAME to NAME.old  ->  rename NAME.tmp to NAME  ->  remove NAME.old

NAME is only ever created by renaming a complete NAME.tmp, and NAME.old is only removed while NAME
exists, so at every instant NAME is complete, or NAME is missing and NAME.old is complete (between the
two renames, or after a crash there). Readers go through `read_folder`, which takes NAME.old when NAME
is missing and reads again if the folder was swapped under it. A symlink swap would be one rename,
but a model folder should stay a plain folder that `cp -r`, zip and upload copy as it is.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def replace_file(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp) to write the new content into a temporary file, then move it into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk keeps no partial file around
        raise
    _fsync(path.parent)


def replace_folder(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp) to fill a new, empty folder, then swap it in for `path` (see the module docstring)."""
    path = Path(path)
    tmp, old = _sibling(path, ".tmp"), _sibling(path, ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write: never a reader's version
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        for file in tmp.iterdir():
            _fsync(file)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)  # `path` is whole, so a stale .old can go
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def whole_version(path: str | Path) -> Path:
    """`path`, or its .old twin while a folder swap is between its two renames (or a crash left it so)."""
    path = Path(path)
    old = _sibling(path, ".old")
    return old if not path.exists() and old.exists() else path


def read_folder(path: str | Path, read: Callable[[Path], T], attempts: int = 5) -> T:
    """read(folder) on one whole version of the folder at `path`. If the folder was swapped while it
    was being read (a writer in another process), its files may be of two versions: read again."""
    for attempt in range(attempts):
        folder = whole_version(path)
        before = _identity(folder)
        try:
            result = read(folder)
        except Exception:
            if _identity(folder) == before or attempt == attempts - 1:
                raise  # nothing moved: a real error
            continue
        if _identity(folder) == before:
            return result
    raise OSError(f"{path} kept changing while it was read ({attempts} times); try again")


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _fsync(path: Path) -> None:
    """Push a file to the disk, so a power cut after the rename cannot undo it; a full disk can first
    show here. For a folder (its entries, after a rename) this is best effort: Windows cannot open one
    and some file systems refuse it."""
    is_dir = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)
