"""Where the demo builders write: a refusal before any work, an atomic save, and checksums of the
committed micro base."""

from __future__ import annotations

import hashlib
from pathlib import Path

from prolong.data.storage import atomic_output_dir


class DemoError(Exception):
    """Bad input to `python -m prolong.demo`: printed as one line, exit status 2."""


def refuse_non_empty(out_dir: str, overwrite: bool) -> None:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file, not a directory; choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DemoError(f"--out {out} is not empty; pass --overwrite to replace its contents, or choose another --out.")


def save_atomically(out_dir: str, overwrite: bool, *savables) -> str:
    """Write each `save_pretrained`-able object into a temporary sibling, then move it into place."""
    refuse_non_empty(out_dir, overwrite)
    # the check above is the refusal; an empty or absent directory may be replaced
    with atomic_output_dir(out_dir, overwrite=True) as staging:
        for savable in savables:
            savable.save_pretrained(staging)
    return out_dir


def write_checksums(directory: str) -> None:
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}"
             for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name != "SHA256SUMS"]
    (Path(directory) / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def verify_checksums(directory: str) -> None:
    sums = Path(directory) / "SHA256SUMS"
    if not sums.exists():
        raise DemoError(f"{sums} is missing; regenerate the base with `python -m prolong.demo train-base`.")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        if hashlib.sha256((Path(directory) / name).read_bytes()).hexdigest() != digest:
            raise DemoError(f"{Path(directory) / name} does not match its SHA256SUMS entry; restore it with "
                            "`git checkout` or regenerate it with `python -m prolong.demo train-base`.")
