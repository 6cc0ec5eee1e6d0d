"""Making written files and directory entries durable (survive a power loss), for the checkpoint
marker (checkpoints.py) and the final save (final_save.py)."""

from __future__ import annotations

import os


def fsync_tree(path: str) -> None:
    """Flush every file and directory under ``path`` (and ``path`` itself) to the disk."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(path: str) -> None:
    """Make the directory's entries (created or renamed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
