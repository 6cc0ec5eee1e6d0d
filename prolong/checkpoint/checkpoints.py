"""Checkpoints that are complete (a marker written last, after every file is synced) or ignored, resume
from the newest complete one with its data position; why the Trainer's own is not enough: docs/scale-out.md."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Callable

from prolong.checkpoint.digest import ALGORITHM, file_digest, record_digest
from prolong.checkpoint.final_save import recover_final_save
from prolong.checkpoint.fsync import fsync_dir, fsync_tree
from prolong.checkpoint.identity import refuse_changes, run_identity
from prolong.checkpoint.ownership import (MARKER, check_owner, file_states, input_paths, lock_output_dir, note_written,
                                          read_record, refuse_inputs_inside, release_output_dir, write_record)
from prolong.errors import RecipeError

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_RESUME_NEWEST = ("true", "auto", "latest")
_NO_RESUME = ("", "none", "false", "no")


def _file_sizes(path: str) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            sizes[os.path.relpath(full, path)] = os.path.getsize(full)
    return sizes


def mark_complete(path: str, record: dict, digests: dict[str, str] | None = None) -> None:
    """Write the marker (after the caller fsynced the checkpoint), then sync it and its directory.
    ``digests``: the files' content digests from that fsync pass (any missing are read now)."""
    sizes, digests = _file_sizes(path), dict(digests or {})
    record = dict(record, files=sizes, **{ALGORITHM: {n: digests.get(n) or file_digest(os.path.join(path, n))
                                                      for n in sizes}})
    record["marker_digest"] = record_digest(record)
    tmp = os.path.join(path, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MARKER))
    fsync_dir(path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


# -- completeness ----------------------------------------------------------------------------
def incomplete_reason(path: str) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is."""
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        return f"no {MARKER} (its save did not finish)"
    try:
        with open(marker) as f:
            record = json.load(f)
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MARKER} is unreadable ({type(error).__name__})"
    for name, size in files.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        actual = os.path.getsize(full)
        if actual != size:
            return f"{name} has {actual} bytes, {size} were written (truncated: power loss or a copy cut short)"
    return None


_VERIFIED: set[tuple] = set()  # checkpoints whose content this process checked (marker's path and mtime)


def verify_content(path: str) -> None:
    """Refuse a complete checkpoint whose files differ from the digests its marker recorded."""
    marker = os.path.join(path, MARKER)
    key = (os.path.realpath(path), os.stat(marker).st_mtime_ns)
    if key in _VERIFIED:
        return
    with open(marker) as f:
        record = json.load(f)
    written = record.pop("marker_digest", None)
    if written is not None and written != record_digest(record):
        raise RecipeError(
            f"resume_from_checkpoint: {path}: {MARKER} was edited after it was written (its content no longer matches "
            f"its digest). Restore it, remove {os.path.basename(os.path.normpath(path))} (the newest complete "
            "checkpoint before it is then taken), or start over with overwrite_output_dir: true."
        )
    for name, expected in (record.get(ALGORITHM) or {}).items():
        if file_digest(os.path.join(path, name)) != expected:
            raise RecipeError(
                f"resume_from_checkpoint: {path}: {name} differs from what was written at step "
                f"{record.get('global_step')} (its size is intact: damaged on disk or in a copy, or edited). Remove "
                f"{os.path.basename(os.path.normpath(path))} (the newest complete checkpoint before it is then taken), "
                "or start over with overwrite_output_dir: true."
            )
    if ALGORITHM not in record:
        logger.warning("%s was written without content digests: only its file sizes are checked.", path)
    _VERIFIED.add(key)


def checkpoint_record(path: str, verify: bool = False) -> dict:
    """The marker of a complete checkpoint: global_step, sequences_consumed, sequences_per_step, identity."""
    reason = incomplete_reason(path)
    if reason is not None:
        raise RecipeError(
            f"resume_from_checkpoint: {path} is not a complete checkpoint: {reason}. Resume from another "
            "one, or use resume_from_checkpoint: auto (the newest complete one)."
        )
    if verify:
        verify_content(path)
    with open(os.path.join(path, MARKER)) as f:
        return json.load(f)


def checkpoints(directory: str) -> list[tuple[int, str]]:
    """Every ``checkpoint-N`` directory under ``directory``, oldest step first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _CHECKPOINT.fullmatch(name)
        if match and os.path.isdir(os.path.join(directory, name)):
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


def last_checkpoint(directory: str, log: bool = True, verify: bool = False) -> str | None:
    """The newest complete ``checkpoint-N`` under ``directory`` (None if there is none); logs
    each newer one it skips and why. ``verify``: refuse it if its content is damaged."""
    for _, path in reversed(checkpoints(directory)):
        reason = incomplete_reason(path)
        if reason is None:
            if verify:
                verify_content(path)
            return path
        if log:
            logger.warning("Skipping %s: %s.", path, reason)
    return None


# -- what a run does with an output_dir that holds checkpoints --------------------------------
def remove_checkpoint(path: str) -> None:
    """Marker first: a removal cut short leaves a directory that no resume picks."""
    try:
        os.remove(os.path.join(path, MARKER))
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def resolve_resume(args, *configs, stage: str) -> tuple[str | None, Callable[[], None]]:
    """The checkpoint this run continues from (None: start at step 0), per the rules above, once the
    output_dir is this run's to write (ownership.py: no input inside it, locked, ours, same stage)
    and the run is the one its record and the checkpoint's marker name; and the call that writes the
    output_dir's record, made once the inputs are loaded, so that a refused input leaves nothing.
    ``configs``: the recipe's other dataclasses (model, data), whose inputs the identity covers."""
    with args.main_process_first(desc="resolve resume_from_checkpoint", local=False):
        if args.process_index != 0:
            return _resolve(args, log=False, verify=False), _nothing_to_write  # the main process checked it all
        out = args.output_dir
        refuse_inputs_inside(out, input_paths(args, *configs))
        lock_output_dir(out)
        try:
            recover_final_save(out)
            identity = run_identity(stage, args, *configs)
            record = check_owner(out, identity, _checkpoint_stage(out), getattr(args, "overwrite_output_dir", False))
            path = _resolve(args, log=True, verify=True)
            if path is not None:
                _check_resumed(path, identity)
            if getattr(args, "load_optimizer_state", False) and args.init_from:
                last_checkpoint(args.init_from, log=False, verify=True)  # the one the trainer loads
            new = {"stage": stage, "identity": identity, "files": (record or {}).get("files", [])}
        except Exception:
            release_output_dir(out)  # refused: nothing of this run is left beside output_dir
            raise
        return path, (_nothing_to_write if new == record else functools.partial(write_record, out, new))


def _nothing_to_write() -> None:
    pass


def _checkpoint_stage(directory: str) -> str | None:
    """The stage the newest checkpoint with a recorded identity was trained in."""
    for _, path in reversed(checkpoints(directory)):
        try:
            with open(os.path.join(path, MARKER)) as f:
                return json.load(f)["identity"]["stage"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _check_resumed(path: str, identity: dict) -> None:
    """The checkpoint's step agrees in its marker, its trainer_state.json and its name, and it is this run's."""
    record = checkpoint_record(path)
    match = _CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(path)))
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state_step = json.load(f)["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        state_step = None
    steps = {MARKER: record["global_step"], "trainer_state.json": state_step,
             "its name": int(match.group(1)) if match else None}
    if len({step for step in steps.values() if step is not None}) > 1:
        said = ", ".join(f"{where}: {step}" for where, step in steps.items())
        raise RecipeError(
            f"resume_from_checkpoint: {path} disagrees on its step ({said}): "
            f"edited after it was written. Restore it, remove it (the newest complete checkpoint before it is then "
            "taken), or start over with overwrite_output_dir: true."
        )
    if record.get("identity") is None:
        logger.warning("%s was written without a run identity: its model, tokenizer and data are not checked.", path)
    else:
        refuse_changes(record["identity"], identity, f"{path} (step {record['global_step']}) is a checkpoint of")


def finished_run(args) -> bool:
    """Whether output_dir already holds this recipe's final model (its step reached max_steps).

    ``resume_from_checkpoint: auto`` then has nothing to continue: rerunning the same command (a
    second ``make demo``, a requeued job that had finished) reports the finished model instead of
    loading everything to train zero steps and saving the same weights again.
    """
    text = "" if args.resume_from_checkpoint is None else str(args.resume_from_checkpoint).strip().lower()
    if getattr(args, "overwrite_output_dir", False) or text not in _RESUME_NEWEST or args.max_steps <= 0:
        return False
    state = os.path.join(args.output_dir, "trainer_state.json")  # written last but one by the final save
    if not os.path.exists(os.path.join(args.output_dir, "config.json")):
        return False
    try:
        with open(state) as f:
            step = json.load(f)["global_step"]
    except (OSError, ValueError, KeyError):
        return False
    if step < args.max_steps:
        return False
    release_output_dir(args.output_dir)
    if args.process_index == 0:
        logger.warning(
            "%s already holds the final model of this run (step %d, max_steps %d): nothing to train. Raise "
            "max_steps to train further, or start over with overwrite_output_dir: true.",
            args.output_dir, step, args.max_steps,
        )
    return True


def _resolve(args, log: bool, verify: bool) -> str | None:
    value = args.resume_from_checkpoint
    text = "" if value is None else str(value).strip()
    existing = checkpoints(args.output_dir)
    names = ", ".join(os.path.basename(p) for _, p in existing)
    if getattr(args, "overwrite_output_dir", False):
        if text.lower() not in _RESUME_NEWEST + _NO_RESUME:
            raise RecipeError(
                f"overwrite_output_dir: true starts over, resume_from_checkpoint: {text} continues a run: "
                "remove one of them."
            )
        if existing and log:
            logger.warning("overwrite_output_dir: removing %s from %s; training starts at step 0.", names, args.output_dir)
        if args.process_index == 0:
            for _, path in existing:
                remove_checkpoint(path)
        return None
    if text.lower() in _NO_RESUME:
        if existing:
            raise RecipeError(
                f"output_dir {args.output_dir} already holds {names} from an earlier run, and "
                f"resume_from_checkpoint is {text or 'unset'}: continue it with resume_from_checkpoint: auto, "
                "start over with overwrite_output_dir: true (removes them), or choose another output_dir."
            )
        return None
    if text.lower() in _RESUME_NEWEST:
        path = last_checkpoint(args.output_dir, log=log, verify=verify)
        if log:
            if path is not None:
                logger.info("Resuming from %s (the newest complete checkpoint).", path)
            elif existing:
                logger.warning("No complete checkpoint in %s: training starts at step 0.", args.output_dir)
        return path
    if not os.path.isdir(text):
        raise RecipeError(f"resume_from_checkpoint: not found: {text}")
    checkpoint_record(text, verify=verify)  # refuses an incomplete or damaged one, naming why
    match = _CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(text)))
    same_dir = os.path.realpath(os.path.dirname(os.path.normpath(text))) == os.path.realpath(args.output_dir)
    newer = [p for s, p in existing if same_dir and match and s > int(match.group(1)) and incomplete_reason(p) is None]
    if newer:
        raise RecipeError(
            f"resume_from_checkpoint: {text} is older than {', '.join(map(os.path.basename, newer))} in the same "
            "output_dir, which a later `auto` resume would pick: remove those, or resume with "
            "resume_from_checkpoint: auto."
        )
    return text


# -- the Trainer side ------------------------------------------------------------------------
class CompleteCheckpointsMixin:
    """For a transformers Trainer: checkpoints with a completion marker and the data position,
    rotation after the marker, and resuming at the exact next unseen sequence."""

    _position_at_start = 0  # sequences consumed before this train() call
    _step_at_start = 0

    def sequences_per_step(self) -> int:
        data_parallel = self.args.world_size // getattr(self.args, "sequence_parallel_size", 1)
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * data_parallel

    def sequences_consumed(self) -> int:
        return self._position_at_start + (self.state.global_step - self._step_at_start) * self.sequences_per_step()

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise RecipeError(f"resume_from_checkpoint: no complete checkpoint in {self.args.output_dir}.")
        if resume_from_checkpoint:
            record = checkpoint_record(resume_from_checkpoint, verify=self.args.process_index == 0)
            if 0 < self.args.max_steps <= record["global_step"]:
                logger.warning(
                    "%s is at step %d, max_steps is %d: nothing left to train (the final model is saved "
                    "again). Raise max_steps to train further, or start over with overwrite_output_dir: true.",
                    resume_from_checkpoint, record["global_step"], self.args.max_steps,
                )
            self._continue_data_at(record)
            self._position_at_start, self._step_at_start = record["sequences_consumed"], record["global_step"]
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _continue_data_at(self, record: dict) -> None:
        consumed, per_step = record["sequences_consumed"], self.sequences_per_step()
        dataset = self.train_dataset
        recorded, current = record.get("data_stream"), getattr(dataset, "stream_identity", lambda: None)()
        changed = sorted(k for k in (recorded or {}) if current is not None and k != "balanced_block"
                         and recorded[k] != current.get(k))
        if changed:
            raise RecipeError(
                f"{', '.join(changed)}: the checkpoint at step {record['global_step']} was trained on the stream of "
                f"{', '.join(f'{k}={recorded[k]}' for k in changed)}; this run has "
                f"{', '.join(f'{k}={current.get(k)}' for k in changed)}. Continuing at sequence {consumed} of another "
                "stream would repeat some sequences and skip others: resume with the checkpoint's values, or start "
                "over with overwrite_output_dir: true."
            )
        if hasattr(dataset, "start_at"):
            # the dataset starts at the next unseen sequence; the Trainer must not skip batches
            # itself (it would skip global_step x this run's batch)
            dataset.start_at(consumed)
            self.args.ignore_data_skip = True
            logger.info("Data continues at sequence %d (%d per step from here).", consumed, per_step)
        elif consumed != record["global_step"] * per_step:
            raise RecipeError(
                f"global_batch_size: the checkpoint at step {record['global_step']} consumed {consumed} sequences "
                f"({record['sequences_per_step']} per step), this run takes {per_step} per step; the Trainer's "
                f"resume would skip {record['global_step'] * per_step} and so repeat or skip data. Resume with "
                f"global_batch_size: {record['sequences_per_step']}, or start over with overwrite_output_dir: true."
            )

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        path = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(path):  # a stale one (an abandoned run's): never mix files
            remove_checkpoint(path)
        self.accelerator.wait_for_everyone()
        before = file_states(self.args.output_dir)  # TRL writes its card, a push model files, into output_dir
        # rotate, and push (hub_strategy), once this one is complete: the Trainer pushes from inside
        # its _save_checkpoint, so a pushed last-checkpoint/ had no marker and no resume took it
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        push, self.args.push_to_hub = self.args.push_to_hub, False
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit, self.args.push_to_hub = limit, push
        self.accelerator.wait_for_everyone()  # every rank's files (rng states, shards) are written
        digests = {} if self.args.should_save else None
        if self.accelerator.is_local_main_process:
            fsync_tree(path, digests)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_complete(path, {
                "global_step": self.state.global_step,
                "sequences_consumed": self.sequences_consumed(),
                "sequences_per_step": self.sequences_per_step(),
                "data_stream": getattr(self.train_dataset, "stream_identity", lambda: None)(),
                "identity": (read_record(self.args.output_dir) or {}).get("identity"),
            }, digests)
        if push:
            self._push_from_checkpoint(path)
        if self.args.should_save:  # ours: the next final save may replace them
            note_written(self.args.output_dir, before)
        if self.args.should_save:
            self._rotate_complete_checkpoints(os.path.dirname(path))
        self.accelerator.wait_for_everyone()

    def _rotate_complete_checkpoints(self, directory: str) -> None:
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        best = os.path.realpath(self.state.best_model_checkpoint) if self.state.best_model_checkpoint else None
        complete = [p for _, p in checkpoints(directory) if incomplete_reason(p) is None]
        keep = set(complete[-limit:]) | ({best} if best else set())
        # a checkpoint push (hub_strategy) uploads its folder in the background, and the Trainer skips the next
        # push while it runs: deleting that folder now would make the push fail. It goes at a later rotation
        # (the next checkpoint's, or HubPushMixin's once the push is done)
        uploading = {getattr(job, "prolong_checkpoint", None) for job in getattr(getattr(self, "push_in_progress", None),
                                                                                 "jobs", []) if not job.done()}
        for _, path in checkpoints(directory):
            if os.path.realpath(path) in uploading:
                continue
            if path not in keep and os.path.realpath(path) != best:
                logger.info("save_total_limit=%d: removing %s", limit, path)
                remove_checkpoint(path)
