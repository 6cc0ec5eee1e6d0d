"""Content digests (xxh3-128, about 7 GB/s on one core; sha256 runs at 0.5): whole files for checkpoints, models
and tokenizers, and a sampled digest for data folders, which are too large to read at every start."""

from __future__ import annotations

import json
import os

import xxhash

ALGORITHM = "xxh3_128"
_CHUNK = 8 << 20


def fd_digest(fd: int) -> str:
    """Digest of an open file read from its start (the caller's fd; its offset moves to the end)."""
    digest, buffer = xxhash.xxh3_128(), bytearray(_CHUNK)
    view, offset = memoryview(buffer), 0
    while read := os.preadv(fd, [buffer], offset):
        digest.update(view[:read])
        offset += read
    return digest.hexdigest()


def file_digest(path: str) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return fd_digest(fd)
    finally:
        os.close(fd)


def record_digest(record: dict) -> str:
    """Digest of a JSON record (a marker's own content, so an edited marker is noticed too)."""
    return xxhash.xxh3_128(json.dumps(record, sort_keys=True).encode()).hexdigest()


def sampled_digest(path: str, blocks: int = 16, block_size: int = 8192, whole_below: int = 1 << 20) -> str:
    """Size and ``blocks`` evenly spaced blocks (first and last included); the whole file below ``whole_below``
    bytes. A rebuilt dataset (other documents, tokenizer or length) differs in nearly every block."""
    size = os.path.getsize(path)
    if size <= whole_below:
        return file_digest(path)
    digest = xxhash.xxh3_128(str(size).encode())
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek((size - block_size) * i // (blocks - 1))
            digest.update(f.read(block_size))
    return digest.hexdigest()
