"""Folders that appear whole or not at all: the one swap that datasets and checkpoints both use."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_in(tmp: Path, folder: Path) -> None:
    """Replace folder by the finished tmp: the old one (if any) is moved aside, tmp renamed in, the
    parent synced, the old one deleted. A crash leaves folder whole (old or new) or `<folder>.old`."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)
