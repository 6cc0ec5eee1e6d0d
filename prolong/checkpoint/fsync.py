"""Making written files and directory entries durable (survive a power loss), for the checkpoint
marker (checkpoints.py) and the final save (final_save.py)."""

from __future__ import annotations

import os

from prolong.checkpoint.digest import fd_digest


def fsync_tree(path: str, digests: dict[str, str] | None = None) -> None:
    """Flush every file and directory under ``path`` (and ``path`` itself) to the disk. With ``digests``,
    also fill it with each file's content digest (relative path -> digest), read in the same pass while
    the just-written pages are still in memory (the Trainer's writers, safetensors and torch.save's zip
    writer, write from native code: there is no stream to hash on the way)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            fd = os.open(full, os.O_RDONLY)
            try:
                if digests is not None:
                    digests[os.path.relpath(full, path)] = fd_digest(fd)
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
