"""Where a run may write, and one run at a time.

A run writes into an output_dir that is new, empty, or made by a run of ours: its record (``RECORD``)
names the stage, the run's identity (identity.py) and the files our saves wrote there (name, size and
mtime): only those, unchanged since, are a later final save's to remove or replace. An output_dir that is, or contains, one of the run's inputs is
refused, and so is one holding another stage's output. An exclusive lock beside output_dir (flock: the
kernel drops it when the process dies, so a crash leaves no stale lock) makes a second run refuse at once;
the lock file is removed when the run ends.
"""

from __future__ import annotations

import atexit
import fcntl
import fnmatch
import json
import os
import re
import socket
import time

from prolong.checkpoint.fsync import fsync_dir
from prolong.checkpoint.identity import refuse_changes
from prolong.errors import RecipeError

RECORD = "_prolong_run.json"  # "_": the Trainer's Hub pushes skip it
MARKER = "checkpoint_complete.json"  # in each complete checkpoint (checkpoints.py)
# what a run writes at the top of output_dir besides the final model's files: a folder holding only
# these, one of them a checkpoint with our marker (copied in, or from before records existed), is ours
_RUN_FOLDERS = re.compile(r"checkpoint-\d+|runs|last-checkpoint")
# names a final save writes: an unrecorded file of these names would be replaced by it
FINAL_SAVE_NAMES = (
    "config.json", "generation_config.json", "model*.safetensors", "*.index.json", "pytorch_model*.bin",
    "adapter_*", "README.md", "trainer_state.json", "training_args.bin", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*", "*.model",
)
INPUT_FIELDS = ("model_name_or_path", "tokenizer_name_or_path", "init_from", "dataset_mixture", "dataset_name",
                "chat_template_path", "deepspeed", "fsdp_config")


# -- the record ------------------------------------------------------------------------------
def read_record(directory: str) -> dict | None:
    path = os.path.join(directory, RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if isinstance(record, dict):
            return record
    except (OSError, ValueError):
        pass
    raise RecipeError(f"output_dir: {path} is unreadable (not the JSON a run writes there); restore it, or choose "
                      "another output_dir.")


def write_record(directory: str, record: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, RECORD + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, RECORD))
    fsync_dir(directory)


def file_states(directory: str) -> dict[str, list[int]]:
    """Top-level files of ``directory``: [size, mtime_ns], which change when one is rewritten or edited."""
    states = {}
    for entry in os.scandir(directory) if os.path.isdir(directory) else ():
        if entry.is_file(follow_symlinks=False) and entry.name not in (RECORD, RECORD + ".tmp"):
            stat = entry.stat(follow_symlinks=False)
            states[entry.name] = [stat.st_size, stat.st_mtime_ns]
    return states


def _recorded(record: dict | None) -> dict[str, list | None]:
    files = (record or {}).get("files") or {}
    return files if isinstance(files, dict) else dict.fromkeys(files)  # a list: names only


def ours(directory: str, record: dict | None) -> set[str]:
    """The files of ``directory`` our saves wrote and nobody changed since."""
    states = file_states(directory)
    return {name for name, state in _recorded(record).items()
            if name in states and (state is None or list(state) == states[name])}


def note_written(directory: str, before: dict[str, list[int]]) -> None:
    """Add to the record the top-level files written since ``before`` (TRL's card, a Hub push's model files)."""
    record = read_record(directory)
    if record is None:
        return
    written = {name: state for name, state in file_states(directory).items() if before.get(name) != state}
    if written:
        write_record(directory, dict(record, files={**_recorded(record), **written}))


# -- the checks at start ---------------------------------------------------------------------
def input_paths(args, *configs) -> list[tuple[str, str]]:
    """(field, local path) of every input the recipe names that exists here."""
    found = []
    for obj in (*configs, args):
        for field in INPUT_FIELDS:
            value = getattr(obj, field, None)
            values = list(value) if field == "dataset_mixture" and isinstance(value, dict) else [value]
            found += [(field, v) for v in values if isinstance(v, str) and v and os.path.exists(v)]
    return found


def refuse_inputs_inside(output_dir: str, inputs: list[tuple[str, str]]) -> None:
    """A run never writes over its own input: output_dir may not be an input or a folder holding one."""
    out = os.path.realpath(output_dir)
    for field, value in inputs:
        path = os.path.realpath(value)
        if path == out and field == "init_from":
            raise RecipeError(
                f"init_from: {value} is also this run's output_dir: a stage writes to a folder of its own (the "
                "previous stage's checkpoints are not this stage's to continue). Set output_dir to a new folder."
            )
        if path == out or path.startswith(out.rstrip(os.sep) + os.sep):
            where = "is" if path == out else "contains"
            raise RecipeError(
                f"output_dir: {output_dir} {where} this run's {field} ({value}): the run would write over its own "
                "input. Choose another output_dir (a new folder)."
            )


def _named(names: list[str]) -> str:
    return ", ".join(sorted(names)[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_owner(output_dir: str, identity: dict, checkpoint_stage: str | None, overwrite: bool) -> dict | None:
    """Refuse an output_dir that is not ours, or holds another stage's output or (unless ``overwrite``) another
    run's; return its record. A folder with no checkpoint and no saved model (a run that stopped before
    its first save) holds nothing to protect: any run of ours may take it."""
    if not os.path.isdir(output_dir):
        return None
    record = read_record(output_dir)
    names = [n for n in os.listdir(output_dir) if n not in (RECORD, RECORD + ".tmp")]
    if record is None:
        foreign = [n for n in names if not (_RUN_FOLDERS.fullmatch(n) and os.path.isdir(os.path.join(output_dir, n)))]
        if not any(os.path.isfile(os.path.join(output_dir, n, MARKER)) for n in names):
            foreign = names  # another tool's checkpoint-N folders are not ours to continue or remove
        if foreign:
            raise RecipeError(
                f"output_dir: {output_dir} already holds {_named(foreign)}, which no run of ours wrote there. A run "
                "writes only into a new or empty folder, or one a run made (its "
                f"{RECORD} says so), so that its saves never replace or remove your files. Choose another output_dir."
            )
    else:
        mine = ours(output_dir, record)
        foreign = [n for n in names if n not in mine and os.path.isfile(os.path.join(output_dir, n))
                   and any(fnmatch.fnmatch(n, pattern) for pattern in FINAL_SAVE_NAMES)]
        if foreign:
            raise RecipeError(
                f"output_dir: {output_dir} holds {_named(foreign)}, which no save of this run wrote (or which changed "
                "since), and its final save would replace them: move them elsewhere, or choose another output_dir."
            )
    if not (record or {}).get("files") and not any(re.fullmatch(r"checkpoint-\d+", n) for n in names):
        return record
    stage, previous = identity["stage"], (record or {}).get("stage") or checkpoint_stage
    if previous and previous != stage:
        field = "model_name_or_path" if stage == "sft" else "init_from"
        raise RecipeError(
            f"output_dir: {output_dir} holds the output of stage {previous}; a run of stage {stage} never continues "
            f"or replaces another stage's output (overwrite_output_dir included). Choose a new output_dir; to start "
            f"from that model, set {field}: {output_dir}."
        )
    if record and record.get("identity") and not overwrite:
        refuse_changes(record["identity"], identity, f"output_dir {output_dir} holds a run of")
    return record


# -- one run at a time -----------------------------------------------------------------------
_HELD: dict[str, int] = {}  # lock file -> fd, for this process (a second main() in one process reuses it)


def _lock_path(output_dir: str) -> str:
    parent, name = os.path.split(os.path.realpath(output_dir))
    return os.path.join(parent, f".{name}.lock")  # beside output_dir, like the final save's staging folder


def lock_output_dir(output_dir: str) -> None:
    """Hold an exclusive lock on output_dir until this process ends (or :func:`release_output_dir`)."""
    path = _lock_path(output_dir)
    if path in _HELD:
        return
    while True:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise RecipeError(f"output_dir: cannot create {path} ({error.strerror}): a run locks its output_dir and "
                              "stages its final model beside it; choose an output_dir in a writable folder.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RecipeError(
                f"output_dir: {output_dir} is in use by another run ({holder}); two runs writing one output_dir "
                "would overwrite each other's checkpoints and final model. Wait for it to end, or choose another "
                "output_dir."
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it as it ended: lock the next one
    os.ftruncate(fd, 0)
    holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    os.pwrite(fd, holder.encode(), 0)
    _HELD[path] = fd


def release_output_dir(output_dir: str) -> None:
    _release(_lock_path(output_dir))


def _release(path: str) -> None:
    fd = _HELD.pop(path, None)
    if fd is not None:
        try:
            os.remove(path)  # while still locked: a run that opened it meanwhile sees it gone and retries
        except FileNotFoundError:
            pass
        os.close(fd)  # closing drops the flock


atexit.register(lambda: [_release(path) for path in list(_HELD)])  # an error exit (sys.exit 2) too
