"""On-disk plumbing shared by every `prolong-data` command.

* `atomic_output_dir`: outputs are built in a temporary sibling directory and renamed into place
  only when complete, so a crash, Ctrl-C or full disk never leaves a half-written directory that
  looks finished. An existing output is refused unless `overwrite=True` (`--overwrite`), and even
  then only a previous output of the same command (`check_output_dir`) is replaced: never the
  command's input, a folder holding or inside it, a file, or a folder with anything else in it.
  The output gets the permissions the umask gives (not mkdtemp's 0700). Temporary dirs are named
  `.NAME.tmp-HOST-PID-*` (scratch caches `.NAME.cache-HOST-PID-*`): the next run removes those
  whose process is gone (a killed run) and reports any other.
* `ShardedDatasetWriter`: streams pyarrow tables into `data-XXXXX-of-NNNNN.arrow` shards with
  datasets' own `ArrowWriter`, then writes the `state.json` / `dataset_info.json` pair that
  `datasets.load_from_disk` reads. Memory stays bounded by one batch, whatever the corpus size.
* `iter_table_chunks`: reads a dataset's Arrow files batch by batch (no memory map), so reading a
  corpus larger than RAM keeps the resident set small.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets.arrow_writer import ArrowWriter
from datasets.table import ConcatenationTable, MemoryMappedTable

logger = logging.getLogger("prolong.data")

METADATA_FILENAME = "prolong_data.json"
FORMAT_VERSION = 1
DEFAULT_SHARD_BYTES = 500 * 1024**2  # the same default as Dataset.save_to_disk


def created_by() -> str:
    try:
        from importlib.metadata import version

        return f"prolong-data {version('prolong-recipes')}"
    except Exception:  # noqa: BLE001 - not installed as a distribution (running from a checkout)
        return "prolong-data"


# What a prolong-data output folder holds: the files it writes, and datasets' caches of maps over it.
_OWN_FILE = re.compile(r"(prolong_data\.json|state\.json|dataset_info\.json|README\.md|\.README\.md\.tmp"
                       r"|data-\d+-of-\d+\.arrow|cache-[\w.-]+\.arrow|tmp[\w.-]*)")
COMMANDS = {"prolong-tokenized": "prolong-data tokenize", "prolong-packed": "prolong-data pack / import-mds"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _not_replaceable(out: Path, fmt: str) -> str | None:
    """Why `--overwrite` must not delete `out`, or None when it holds only a previous output of the
    command writing `fmt` (one dataset folder, or a folder of them: import-mds of several domains)."""
    if not out.is_dir():
        return "it is a file, not a prolong-data output folder"
    entries = sorted(out.iterdir())
    if (out / METADATA_FILENAME).is_file():
        found = read_metadata(out).get("format")
        if found != fmt:
            return (f"it holds a {found or 'no format'} output ({COMMANDS.get(found, 'not of prolong-data')}), "
                    f"not a {fmt} one ({COMMANDS[fmt]})")
        foreign = [p.name for p in entries if not (p.is_file() and _OWN_FILE.fullmatch(p.name))]
    else:
        foreign = [p.name for p in entries if not (p.name == "README.md" and p.is_file() or p.is_dir()
                                                     and (p / METADATA_FILENAME).is_file()
                                                     and _not_replaceable(p, fmt) is None)]
        if not foreign and entries and not any(p.is_dir() for p in entries):
            foreign = [p.name for p in entries]  # a README.md alone is not an output
    if foreign:
        return (f"it holds what is not a previous {fmt} output: {', '.join(foreign[:5])}"
                f"{f' and {len(foreign) - 5} more' if len(foreign) > 5 else ''}")
    return None


def check_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False, fmt: str | None = None,
                     inputs: list = ()) -> Path:
    """Refuse an output location that would lose data: the command's own input, a folder inside one or
    holding one, and (with `overwrite`) anything but a previous output of the command writing `fmt`
    (`fmt` None: the caller has checked what it replaces). Returns the absolute output path."""
    out = Path(out_dir).absolute()
    real = Path(os.path.realpath(out))
    for given in inputs:
        if given is None or not os.path.exists(given):
            continue  # a Hub id
        source = Path(os.path.realpath(given))
        if real == source or source in real.parents:
            raise ValueError(f"--out {out} is {'the input' if real == source else 'inside the input'} {given}: "
                             "writing there could destroy the input. Choose an --out outside it")
        if real in source.parents:
            raise ValueError(f"--out {out} holds the input {given}: replacing it would destroy the input. "
                             "Choose another --out")
    if out.exists() or out.is_symlink():
        if not overwrite:
            what = "a complete prolong-data output" if (out / METADATA_FILENAME).exists() else "a path"
            raise FileExistsError(f"output {out} already exists ({what}); pass --overwrite (overwrite=True) to "
                                  "replace it, or choose another output directory")
        problem = _not_replaceable(out, fmt) if fmt is not None else None
        if problem:
            raise FileExistsError(f"output {out} exists and --overwrite replaces only a previous output of "
                                  f"{COMMANDS.get(fmt, 'prolong-data')}: {problem}. Nothing was deleted; choose "
                                  "another --out, or move that folder away yourself")
    return out


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False, *, fmt: str | None = None,
                      inputs: list = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `out_dir` only if the block succeeds
    (`fmt`, `inputs`: see `check_output_dir`)."""
    out = Path(out_dir).absolute()
    if out.parent.is_dir():
        clean_leftovers(out)
    check_output_dir(out, overwrite=overwrite, fmt=fmt, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out, "tmp"), dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would keep teammates out of the output
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # only reachable with overwrite=True, after check_output_dir allowed it
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, out)
    logger.info("wrote %s", out)


def dataset_dirs(dataset) -> list[str]:
    """The folders holding a Dataset's own Arrow files (a saved input): never an output location."""
    return sorted({os.path.dirname(f["filename"]) for f in getattr(dataset, "cache_files", None) or []})


def temp_prefix(out: Path, kind: str) -> str:
    """`.NAME.KIND-HOST-PID-`: a later run can tell whether the process that made it is gone."""
    return f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def _owner_is_gone(path: Path, out: Path) -> bool:
    """True for a temporary dir made on this host by a process that no longer runs."""
    # "tmp-HOST-PID-RANDOM" (mkdtemp's RANDOM has no dash; a host name may)
    parts = path.name[len(f".{out.name}."):].split("-", 1)[-1].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit() or parts[0] != socket.gethostname():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def clean_leftovers(out: str | os.PathLike) -> None:
    """Remove the temporary output/cache dirs a killed run left beside `out` (their process is gone);
    report the ones that may still be in use (another host, a running process, an older name)."""
    out = Path(out).absolute()
    for path in sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.cache-*")):
        if path.name.startswith(tuple(temp_prefix(out, kind) for kind in ("tmp", "cache"))):
            continue  # this process's own (tokenize's scratch cache): neither a leftover nor another run's
        if _owner_is_gone(path, out):
            shutil.rmtree(path, ignore_errors=True)
            logger.warning("removed %s, left by an interrupted run", path)
        else:
            logger.warning("found %s, a temporary dir of another run (still running, or from another host): "
                           "delete it if no run is writing %s", path, out)


def write_metadata(directory: str | os.PathLike, metadata: dict) -> None:
    with open(Path(directory) / METADATA_FILENAME, "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2, sort_keys=False)
        f.write("\n")


def read_metadata(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / METADATA_FILENAME
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): it was damaged or edited; restore it, or create "
                         "the output again") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(metadata).__name__}: restore it, or create "
                         "the output again")
    return metadata


def longest_row(dataset: datasets.Dataset) -> int:
    """Tokens in the longest row of ``input_ids`` (read from the Arrow offsets, no row decoded), of the rows
    a ``select``/``filter`` kept: ``dataset.data`` alone is the whole table under such an indices mapping."""
    column = dataset.with_format("arrow", columns=["input_ids"])[:]["input_ids"]
    return int(pc.max(pc.list_value_length(column)).as_py() or 0)


def load_dataset_dir(directory: str | os.PathLike, flag: str = "input") -> datasets.Dataset:
    """`load_from_disk` with errors that say what is wrong with the directory."""
    path = Path(directory)
    if path.is_file():
        raise NotADirectoryError(f"{flag} {path} is a file; give the directory of a saved dataset "
                                 "(a `prolong-data tokenize` or `pack` output)")
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} directory not found: {path}")
    if not (path / "state.json").exists() and any(path.glob("*/state.json")):
        parts = sorted(p.parent.name for p in path.glob("*/state.json"))
        raise FileNotFoundError(
            f"{flag} directory {path} is not a dataset saved with save_to_disk (no state.json) but holds "
            f"datasets ({', '.join(parts[:8])}{', ...' if len(parts) > 8 else ''}; e.g. one per domain): "
            f"give one of them, e.g. {path / parts[0]}")
    if not (path / "state.json").exists():
        mds = (path / "index.json").exists() or any(path.glob("*/index.json"))
        raise FileNotFoundError(
            f"{flag} directory {path} is not a dataset saved with save_to_disk (no state.json); "
            + ("it holds MDS shards (index.json): convert them with `prolong-data import-mds`" if mds else
               "create it with `prolong-data tokenize` (or `pack`)"))
    try:
        data_files = json.loads((path / "state.json").read_text(encoding="utf-8")).get("_data_files")
    except (OSError, ValueError):
        data_files = None  # unreadable: reported below
    if data_files == []:  # save_to_disk of an empty dataset writes no Arrow file; load_from_disk then fails
        raise ValueError(f"{flag} directory {path} holds an empty dataset (no rows)")
    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{flag} directory {path} cannot be read: {_unreadable_file(path) or error}; "
                         "it is truncated or corrupt: create it again") from error
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"{flag} directory {path} holds a DatasetDict; pass one split's directory")
    return dataset


def _unreadable_file(directory: Path) -> str | None:
    """Name the file of a saved dataset that does not read (pyarrow's errors name none)."""
    for name in ("state.json", "dataset_info.json"):
        try:
            json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            return f"{directory / name} ({type(error).__name__}: {error})"
    for arrow in sorted(directory.glob("*.arrow")):
        try:
            with pa.memory_map(str(arrow)) as source:
                pa.ipc.open_stream(source).read_all()
        except (OSError, ValueError) as error:
            return f"{arrow} ({type(error).__name__}: {error})"
    return None


class ShardedDatasetWriter:
    """Write pyarrow tables as a `save_to_disk`-compatible dataset directory, shard by shard."""

    def __init__(self, directory: str | os.PathLike, features: datasets.Features,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.features = features
        self.max_shard_bytes = max_shard_bytes
        self.shard_paths: list[Path] = []
        self.num_rows = 0
        self._writer: ArrowWriter | None = None
        self._shard_bytes = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self._writer is None or self._shard_bytes >= self.max_shard_bytes:
            self._close_shard()
            path = self.directory / f"shard-{len(self.shard_paths):05d}.arrow"
            self.shard_paths.append(path)
            self._writer = ArrowWriter(features=self.features, path=str(path))
            self._shard_bytes = 0
        self._writer.write_table(table)
        self._shard_bytes += table.nbytes
        self.num_rows += table.num_rows

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.finalize()
            self._writer.close()
            self._writer = None

    def close(self) -> int:
        """Finish the last shard and write the files `load_from_disk` needs. Returns the row count."""
        self._close_shard()
        if not self.shard_paths:  # an empty dataset is still a valid dataset
            writer = ArrowWriter(features=self.features, path=str(self.directory / "shard-00000.arrow"))
            writer.finalize()
            writer.close()
            self.shard_paths.append(self.directory / "shard-00000.arrow")
        num_shards = len(self.shard_paths)
        filenames = []
        for index, path in enumerate(self.shard_paths):  # the names save_to_disk gives its shards
            name = f"data-{index:05d}-of-{num_shards:05d}.arrow"
            os.replace(path, self.directory / name)
            filenames.append(name)
        state = {
            "_data_files": [{"filename": name} for name in filenames],
            "_fingerprint": datasets.fingerprint.generate_random_fingerprint(),
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        with open(self.directory / "state.json", "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        info = datasets.DatasetInfo(features=self.features)
        with open(self.directory / "dataset_info.json", "w", encoding="utf-8") as f:
            json.dump(asdict(info), f, indent=2, sort_keys=True)
        return self.num_rows


def _is_exactly_its_cache_files(dataset: datasets.Dataset) -> bool:
    """True when the dataset's rows are its Arrow files, whole and in order, so they can be
    streamed straight from disk. A contiguous selection (select(range(n)), take, skip, shard,
    an unshuffled split) slices the files without an index mapping, and a concatenation with an
    in-memory dataset lists only its files in `cache_files`: both must go through datasets."""
    if dataset._indices is not None or not dataset.cache_files:
        return False
    table = dataset.data
    blocks = [block for row in table.blocks for block in row] if isinstance(table, ConcatenationTable) else [table]
    return (
        len(blocks) == len(dataset.cache_files)
        and all(isinstance(block, MemoryMappedTable) and not block.replays for block in blocks)
        and sum(block.num_rows for block in blocks) == dataset.num_rows
    )


def iter_table_chunks(dataset: datasets.Dataset, columns: list[str],
                      min_rows: int = 1024, max_values: int = 1 << 22) -> Iterator[pa.Table]:
    """Yield the dataset as pyarrow tables of about `min_rows` rows (fewer if `max_values` list
    values, i.e. tokens, are reached first), reading the Arrow files sequentially."""
    list_column = next((c for c in columns if isinstance(dataset.features[c], datasets.List)), None)

    def record_batches() -> Iterator[pa.RecordBatch]:
        if _is_exactly_its_cache_files(dataset):
            for cache_file in dataset.cache_files:
                with pa.OSFile(cache_file["filename"]) as source:
                    for batch in pa.ipc.open_stream(source):
                        yield batch.select(columns)
        else:  # in-memory dataset or a selection: go through datasets' own iterator
            for table in dataset.with_format("arrow", columns=columns).iter(batch_size=min_rows):
                yield from table.to_batches()

    def small_batches() -> Iterator[pa.RecordBatch]:
        for batch in record_batches():
            for start in range(0, batch.num_rows, min_rows):
                yield batch.slice(start, min_rows)

    pending: list[pa.RecordBatch] = []
    pending_rows = pending_values = 0
    for batch in small_batches():
        pending.append(batch)
        pending_rows += batch.num_rows
        if list_column is not None:
            pending_values += pc.sum(pc.list_value_length(batch.column(list_column))).as_py() or 0
        if pending_rows >= min_rows or pending_values >= max_values:
            yield pa.Table.from_batches(pending).combine_chunks()
            pending, pending_rows, pending_values = [], 0, 0
    if pending:
        yield pa.Table.from_batches(pending).combine_chunks()
