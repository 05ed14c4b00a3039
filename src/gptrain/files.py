"""Files and folders that appear whole or not at all: one helper for files (atomic_path, write_atomic)
and one for folders (swap_in), used by everything that writes what a later run reads.

A file is written beside its final name, fsynced, renamed over it, and its folder fsynced. A folder is
built as `<name>.tmp` and swapped in. Replacing a non-empty folder uses the kernel's atomic exchange
(renameat2 with RENAME_EXCHANGE, Linux 3.15+ on ext4, xfs, btrfs, tmpfs...): at every instant `<name>`
is the old folder or the new one. Where the exchange is missing the old folder is first renamed to
`<name>.old`; a crash between the two renames leaves only `<name>.old`: readers take it in place of
the missing folder (whole_folder) and the next writer, holding the run's or dataset's lock, renames
it back (restore_swaps).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

AT_FDCWD = -100
RENAME_EXCHANGE = 2
OLD_SUFFIX, TMP_SUFFIX = ".old", ".tmp"


def fsync_file(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename is durable once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_file  # the same call on a folder


def sync_folder(folder: Path) -> None:
    """fsync every file in a finished folder, then the folder: what swap_in will name is on disk."""
    for path in folder.iterdir():
        fsync_file(path)
    fsync_dir(folder)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (one per process and thread) to write to, by any library; when the
    block ends without an error it is fsynced and renamed over `path`, and the folder fsynced. On an
    error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{TMP_SUFFIX}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a whole file atomically (text as UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the OS or file system lacks it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # glibc before 2.28, musl
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_in(tmp: Path, folder: Path) -> None:
    """Replace folder by the finished tmp (fsynced by the caller): exchanged atomically where the OS can,
    else through `<folder>.old` (see restore_swaps). The old contents are deleted afterwards."""
    old = folder.with_name(folder.name + OLD_SUFFIX)
    if folder.exists() and _exchange(tmp, folder):
        fsync_dir(folder.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def whole_folder(folder: Path) -> Path:
    """folder, or where a crash in the middle of a fallback swap_in left it (`<folder>.old`)."""
    old = folder.with_name(folder.name + OLD_SUFFIX)
    return old if not folder.exists() and old.is_dir() else folder


def restore_swaps(parent: Path) -> None:
    """Finish swaps a crash interrupted in parent: a `<name>.old` without its `<name>` is renamed back
    (the old folder is whole: the new one never got its name); beside a `<name>` it is deleted."""
    if not parent.is_dir():
        return
    for old in parent.glob(f"*{OLD_SUFFIX}"):
        folder = old.with_name(old.name[: -len(OLD_SUFFIX)])
        if not old.is_dir():
            continue
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(folder)
            fsync_dir(parent)
