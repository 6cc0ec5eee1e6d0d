"""The final save every entry point shares: full weights staged beside `output_dir`, published
atomically, and recovered after a crash mid-publish."""

from __future__ import annotations

import logging
import os
import shutil

from prolong.checkpoint.fsync import fsync_dir, fsync_tree
from prolong.checkpoint.ownership import (RECORD, file_states, note_written, ours, read_record, release_output_dir,
                                          write_record)
from prolong.model_card import write_trainer_model_card

logger = logging.getLogger(__name__)


def save_full_weights(trainer, path: str) -> None:
    """trainer.save_model, with full (gathered) weights even when checkpoints are sharded.

    Every process takes part (FSDP gathers, DeepSpeed consolidates); rank 0 writes. With FSDP's
    SHARDED_STATE_DICT (our fsdp2.yaml: fast checkpoints) the Trainer's save_model writes nothing
    at all, so the final save switches to FULL_STATE_DICT for its duration.
    """
    plugin = trainer.accelerator.state.fsdp_plugin if trainer.is_fsdp_enabled else None
    if plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
        trainer.save_model(path)
        return
    previous = (plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config)
    # set_state_dict_type only fills configs that are None (FSDP1 reads them; FSDP2 gathers anyway)
    plugin.state_dict_config = plugin.optim_state_dict_config = None
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        trainer.save_model(path)
    finally:
        plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config = previous


def require_loadable_weights(path: str) -> None:
    """Refuse to publish a final model directory that from_pretrained could not load."""
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    full_model = has("config.json") and (has("model.safetensors") or has("model.safetensors.index.json"))
    adapter = has("adapter_config.json") and has("adapter_model.safetensors")
    if not (full_model or adapter):
        raise RuntimeError(
            f"The final save wrote no loadable model to {path} (files: {sorted(os.listdir(path))}); "
            "the training checkpoints in output_dir are intact. With DeepSpeed ZeRO-3 set "
            "stage3_gather_16bit_weights_on_model_save: true."
        )


def save_final_model(trainer, *, base_model, stage, recipe, max_length, mixture=None) -> str:
    """Save model, tokenizer and model card to output_dir, atomically, and push if asked.

    The new model is written beside output_dir and the two directories are swapped in one step
    (:func:`publish_directory`), so ``from_pretrained(output_dir)`` loads the previous model until
    the new one is complete, and the new one after: a kill at any point leaves one of the two.
    """
    output_dir = trainer.args.output_dir
    if trainer.state.global_step < trainer.state.max_steps:  # preempted: the checkpoint is the state
        logger.warning(
            "Stopped at step %d of %d: no final model written; run the same command again to continue "
            "(resume_from_checkpoint: auto).",
            trainer.state.global_step,
            trainer.state.max_steps,
        )
        release_output_dir(output_dir)
        return output_dir
    staging, _ = _final_save_siblings(output_dir)
    if trainer.is_world_process_zero():
        recover_final_save(output_dir)  # leftovers of an interrupted save
    trainer.accelerator.wait_for_everyone()
    save_full_weights(trainer, staging)
    if trainer.is_world_process_zero():
        require_loadable_weights(staging)
        trainer.state.save_to_json(os.path.join(staging, "trainer_state.json"))  # the loss curve, for the record
        write_trainer_model_card(trainer, staging, base_model=base_model, stage=stage, recipe=recipe,
                                 max_length=max_length, mixture=mixture, load_path=output_dir)
        # the files this save wrote: the only ones the next final save removes
        record = read_record(output_dir) if os.path.isdir(output_dir) else None
        write_record(staging, dict(record or {"stage": stage}, files=file_states(staging)))
        publish_directory(staging, output_dir)
        logger.info("Saved the final model to %s", output_dir)
    trainer.accelerator.wait_for_everyone()
    if trainer.args.push_to_hub:
        before = file_states(output_dir)
        trainer.push_to_hub(commit_message=f"ProLong {stage}")
        if trainer.is_world_process_zero():  # the Trainer's push saves the model into output_dir again
            note_written(output_dir, before)
    release_output_dir(output_dir)
    return output_dir


# -- publishing a directory in one step ------------------------------------------------------
PUBLISH_MARKER = ".final-complete"  # in the new directory once it is whole: recovery may roll forward
_RENAME_EXCHANGE = 2  # linux/fs.h


def _final_save_siblings(output_dir: str) -> tuple[str, str]:
    """Where the new model is written and where the old directory goes: beside output_dir (same
    file system, so renames are atomic; beside its target if output_dir is a symlink), never inside it."""
    parent, name = os.path.split(os.path.realpath(output_dir))
    return os.path.join(parent, f".{name}.final-new"), os.path.join(parent, f".{name}.final-old")


def _exchange(a: str, b: str) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE; Python has no binding).
    False where the system or file system cannot (then two renames are used)."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), a, None, b)


def _carry_over(output_dir: str, staging: str) -> None:
    """Put output_dir's checkpoints, logs and other files into the new directory: hard links (no
    copy, and output_dir stays whole until the swap), moved where the file system has none.

    The files of the previous final model, as its save recorded them and unchanged since, leave with
    it (a stale adapter_config.json would apply an old LoRA adapter to the new weights, a stale
    tokenizer file would mix tokenizers); nothing else is dropped, and any other file whose name the
    new model also uses (the user's) is kept under another name."""
    previous = ours(output_dir, read_record(output_dir))
    for name in os.listdir(output_dir):
        src, dst = os.path.join(output_dir, name), os.path.join(staging, name)
        if name in (PUBLISH_MARKER, RECORD) or name in previous:
            continue
        if os.path.lexists(dst):
            if os.path.isdir(src) and not os.path.islink(src):
                continue
            dst = _free_name(staging, name + ".orig")
            logger.warning("%s in %s was not written by a save of this run and the new model has a file of that "
                           "name: it is kept as %s.", name, output_dir, os.path.basename(dst))
        if os.path.isdir(src) and not os.path.islink(src):
            try:
                shutil.copytree(src, dst, symlinks=True, copy_function=os.link)
            except OSError:
                shutil.rmtree(dst, ignore_errors=True)
                os.rename(src, dst)  # recover_final_save moves it back if the swap does not happen
        else:
            try:
                os.link(src, dst, follow_symlinks=False)
            except OSError:
                shutil.copy2(src, dst, follow_symlinks=False)


def _free_name(directory: str, name: str) -> str:
    path, n = os.path.join(directory, name), 1
    while os.path.lexists(path):
        path, n = os.path.join(directory, f"{name}.{n}"), n + 1
    return path


def publish_directory(staging: str, output_dir: str) -> None:
    """Make the complete directory ``staging`` the new ``output_dir`` in one step.

    output_dir's own entries (checkpoints, logs) are carried over first, everything is synced,
    then the directories are swapped atomically (or, where the file system cannot swap, renamed
    twice; :func:`recover_final_save` completes an interrupted pair of renames at the next start).
    """
    output_dir = os.path.realpath(output_dir)  # a symlinked output_dir keeps pointing at the new model
    parent = os.path.dirname(output_dir)
    if os.path.isdir(output_dir):
        _carry_over(output_dir, staging)
    fsync_tree(staging)
    with open(os.path.join(staging, PUBLISH_MARKER), "w") as f:
        os.fsync(f.fileno())
    fsync_dir(staging)
    if not os.path.isdir(output_dir):
        os.rename(staging, output_dir)
        retired = None
    elif _exchange(staging, output_dir):
        retired = staging  # now holds the previous directory
    else:
        retired = _final_save_siblings(output_dir)[1]
        os.rename(output_dir, retired)
        os.rename(staging, output_dir)
    fsync_dir(parent)
    os.remove(os.path.join(output_dir, PUBLISH_MARKER))
    if retired is not None:
        shutil.rmtree(retired)


def recover_final_save(output_dir: str) -> None:
    """Finish or undo a final save that was interrupted (run at every start and before a final save).

    - output_dir missing between the two renames: the new directory if it was complete, else the old one;
    - entries moved out of output_dir into the new directory before a swap that never came: moved back;
    - the leftover directory (an unfinished new model, or the previous one after the swap): removed.
    """
    new, old = _final_save_siblings(output_dir)
    output_dir = os.path.realpath(output_dir)
    if not os.path.exists(output_dir):
        if os.path.isfile(os.path.join(new, PUBLISH_MARKER)):
            os.rename(new, output_dir)
        elif os.path.isdir(old):
            os.rename(old, output_dir)
    for leftover in (new, old):
        if not os.path.isdir(leftover):
            continue
        if os.path.isdir(output_dir):
            for name in os.listdir(leftover):
                src, dst = os.path.join(leftover, name), os.path.join(output_dir, name)
                if os.path.isdir(src) and not os.path.islink(src) and not os.path.lexists(dst):
                    logger.warning("Moving %s back into %s (an interrupted final save had moved it).", name, output_dir)
                    os.rename(src, dst)
        logger.info("Removing %s, left by an interrupted final save.", leftover)
        shutil.rmtree(leftover)
    marker = os.path.join(output_dir, PUBLISH_MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    shutil.rmtree(os.path.join(output_dir, ".final-tmp"), ignore_errors=True)  # earlier versions staged there
