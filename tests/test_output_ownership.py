"""Where a run writes (prolong/checkpoint/ownership.py), through run_cpt / run_sft with the tiny model: never
over its own inputs, never into a folder of the user's, the final save removes only files an earlier save of
ours recorded, one run at a time (a lock that a crash does not leave behind), and a stage never takes another
stage's output_dir as its own."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from transformers import TrainerCallback

from helpers import REPO, chat_conversations, cpt_argv, logged_losses, sft_argv, write_chat_jsonl
from prolong.errors import RecipeError
from prolong.run_cpt import main as cpt_main
from prolong.run_sft import main as sft_main


def _tree(path) -> dict[str, str]:
    """Every file under ``path`` (relative name -> sha256): what a refused run must leave as it was."""
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            files[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return files


def _data_copy(packed_mixture, folder) -> dict[str, float]:
    return {str(shutil.copytree(p, folder / os.path.basename(p))): share for p, share in packed_mixture.items()}


@pytest.mark.parametrize("where", ["model", "folder of the model", "tokenizer", "mixture domain", "folder of the data",
                                   "sft dataset folder"])
def test_an_output_dir_that_is_or_holds_an_input_is_refused_and_the_input_untouched(
    tiny_model_dir, packed_mixture, tmp_path, where
):
    model = str(shutil.copytree(tiny_model_dir, tmp_path / "models" / "base"))
    data = _data_copy(packed_mixture, tmp_path / "data")
    field, watched = "model_name_or_path", tmp_path / "models"
    if where == "sft dataset folder":
        (tmp_path / "chats").mkdir()
        chat = write_chat_jsonl(tmp_path / "chats" / "chat.jsonl", chat_conversations(8))
        before = _tree(tmp_path / "chats")
        with pytest.raises(RecipeError, match=r"^output_dir: .*chats contains this run's dataset_name \(.*chat"):
            sft_main(sft_argv(model, chat, str(tmp_path / "chats")))
        assert _tree(tmp_path / "chats") == before
        return
    values = {}
    if where == "model":
        out = model
    elif where == "folder of the model":
        out = str(tmp_path / "models")
    elif where == "tokenizer":
        values["tokenizer_name_or_path"] = out = str(shutil.copytree(tiny_model_dir, tmp_path / "tok"))
        field, watched = "tokenizer_name_or_path", tmp_path / "tok"
    elif where == "mixture domain":
        out, field, watched = next(p for p in data if p.endswith("short")), "dataset_mixture", tmp_path / "data"
    else:
        out, field, watched = str(tmp_path / "data"), "dataset_mixture", tmp_path / "data"
    verb = "contains" if where.startswith("folder") else "is"
    before = _tree(watched)
    with pytest.raises(RecipeError, match=rf"^output_dir: {out} {verb} this run's {field} "):
        cpt_main(cpt_argv(model, data, out, max_steps=1, **values))
    assert _tree(watched) == before


def test_another_tools_checkpoints_are_not_ours_to_continue_or_remove(tiny_model_dir, packed_mixture, tmp_path):
    """checkpoint-N folders without our completeness marker (another trainer's): overwrite_output_dir would have
    removed them."""
    out = tmp_path / "theirs"
    (out / "checkpoint-500").mkdir(parents=True)
    (out / "checkpoint-500" / "optimizer.pt").write_bytes(b"their state")
    with pytest.raises(RecipeError, match=r"^output_dir: .* already holds checkpoint-500, which no run of ours wrote"):
        cpt_main(cpt_argv(tiny_model_dir, packed_mixture, out, max_steps=1, overwrite_output_dir="true"))
    assert (out / "checkpoint-500" / "optimizer.pt").read_bytes() == b"their state"
    assert sorted(os.listdir(tmp_path)) == ["theirs"]  # no lock file left beside it


@pytest.mark.parametrize("stage", ["cpt", "sft"])
def test_a_folder_of_the_users_files_is_refused_before_anything_is_written(
    tiny_model_dir, packed_mixture, tmp_path, monkeypatch, stage
):
    """`output_dir .` in a folder holding a README.md, a config.json, a merges.txt and notes: refused, naming
    them; every file as it was and nothing added."""
    work = tmp_path / "work"
    work.mkdir()
    for name, text in {"README.md": "# my project\n", "config.json": "{}\n", "merges.txt": "a b\n",
                       "notes.txt": "keep\n"}.items():
        (work / name).write_text(text)
    chat = write_chat_jsonl(tmp_path / "chat.jsonl", chat_conversations(8))
    monkeypatch.chdir(work)
    argv = cpt_argv(tiny_model_dir, packed_mixture, ".", max_steps=1) if stage == "cpt" else \
        sft_argv(tiny_model_dir, chat, ".")
    with pytest.raises(RecipeError, match=r"^output_dir: \. already holds README.md, config.json, merges.txt, "
                                          r"notes.txt, which no run of ours wrote there.*Choose another output_dir"):
        (cpt_main if stage == "cpt" else sft_main)(argv)
    assert sorted(os.listdir(work)) == ["README.md", "config.json", "merges.txt", "notes.txt"]
    assert (work / "README.md").read_text() == "# my project\n" and (work / "merges.txt").read_text() == "a b\n"


class _UserWritesDuringTheRun(TrainerCallback):
    """The user drops files into output_dir while the run trains (after its start-up checks)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            for name in ("README.md", "merges.txt", "notes.md"):
                with open(os.path.join(args.output_dir, name), "w") as f:
                    f.write(f"the user's {name}\n")


def test_the_final_save_removes_only_files_an_earlier_save_of_ours_recorded(tiny_model_dir, packed_mixture, tmp_path):
    out = tmp_path / "run"
    cpt_main(cpt_argv(tiny_model_dir, packed_mixture, out, max_steps=2, save_steps=1),
             callbacks=[_UserWritesDuringTheRun()])
    # the new model's card took README.md's name: the user's is kept beside it; the rest is untouched
    assert (out / "README.md.orig").read_text() == "the user's README.md\n"
    assert (out / "merges.txt").read_text() == "the user's merges.txt\n"
    assert (out / "notes.md").read_text() == "the user's notes.md\n"
    with open(out / "_prolong_run.json") as f:
        record = json.load(f)
    assert "model.safetensors" in record["files"] and "merges.txt" not in record["files"]
    # the user edits the card the save wrote; the next run would replace it, and merges.txt (a tokenizer file
    # name) if its tokenizer had one: refused at start
    with open(out / "README.md", "a") as f:
        f.write("my notes on this model\n")
    argv = cpt_argv(tiny_model_dir, packed_mixture, out, max_steps=3, save_steps=1)
    with pytest.raises(RecipeError, match=r"^output_dir: .* holds README.md, merges.txt, which no save of this run "
                                          r"wrote \(or which changed since\)"):
        cpt_main(argv)
    (out / "merges.txt").rename(tmp_path / "merges.txt")
    (out / "README.md").rename(out / "my-card.md")
    # a file the previous save recorded (an adapter of an earlier LoRA model) leaves with that model
    (out / "adapter_config.json").write_text("{}")
    stat = (out / "adapter_config.json").stat()
    with open(out / "_prolong_run.json", "w") as f:
        json.dump(dict(record, files=dict(record["files"], **{"adapter_config.json": [stat.st_size, stat.st_mtime_ns]})),
                  f)
    cpt_main(argv)
    assert not (out / "adapter_config.json").exists()
    assert (out / "README.md.orig").exists() and (out / "notes.md").exists() and (out / "my-card.md").exists()
    assert sorted(logged_losses(out)) == [1, 2, 3]


@pytest.mark.slow
def test_a_second_run_into_the_same_output_dir_is_refused_at_once_and_a_crash_leaves_no_lock(
    tiny_model_dir, packed_mixture, tmp_path
):
    out = tmp_path / "run"
    argv = cpt_argv(tiny_model_dir, packed_mixture, out, max_steps=100000, save_steps=100000)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    first = subprocess.Popen([sys.executable, "prolong/run_cpt.py", *argv], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock, deadline = tmp_path / ".run.lock", time.monotonic() + 120
    try:
        while first.poll() is None and time.monotonic() < deadline:
            if lock.exists() and lock.read_text().startswith(f"pid {first.pid} "):
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        started = time.monotonic()
        with pytest.raises(RecipeError, match=rf"^output_dir: {out} is in use by another run \(pid {first.pid} on "):
            cpt_main(cpt_argv(tiny_model_dir, packed_mixture, out, max_steps=1))
        assert time.monotonic() - started < 10  # before any loading
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    cpt_main(cpt_argv(tiny_model_dir, packed_mixture, out, max_steps=1))  # the killed run's lock went with it
    assert sorted(logged_losses(out)) == [1]


@pytest.fixture(scope="module")
def finished_cpt(tiny_model_dir, packed_mixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpt") / "stage1"
    cpt_main(cpt_argv(tiny_model_dir, packed_mixture, out, max_steps=1, save_steps=1))
    return out


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_sft_never_takes_a_cpt_output_dir_as_its_own(tiny_model_dir, finished_cpt, tmp_path, overwrite):
    """Without the check SFT reported "already holds the final model of this run" and exited 0 (never ran);
    with overwrite_output_dir it would have replaced the CPT model."""
    before = _tree(finished_cpt)
    chat = write_chat_jsonl(tmp_path / "chat.jsonl", chat_conversations(8))
    with pytest.raises(RecipeError, match=rf"^output_dir: {finished_cpt} holds the output of stage continued-"
                                          rf"pretraining; a run of stage sft never continues.*set model_name_or_path: "
                                          rf"{finished_cpt}"):
        sft_main(sft_argv(tiny_model_dir, chat, str(finished_cpt), "--overwrite_output_dir", overwrite))
    assert _tree(finished_cpt) == before


def test_a_stage_whose_init_from_is_its_output_dir_is_refused(tiny_model_dir, packed_mixture, finished_cpt):
    """Stage 2 pointed at stage 1's folder for both: it would have resumed stage 1's checkpoint as its own."""
    before = _tree(finished_cpt)
    with pytest.raises(RecipeError, match=rf"^init_from: {finished_cpt} is also this run's output_dir"):
        cpt_main(cpt_argv(tiny_model_dir, packed_mixture, finished_cpt, init_from=finished_cpt, max_steps=2,
                          rope_theta=20000))
    assert _tree(finished_cpt) == before


@pytest.mark.slow
def test_a_run_pushed_to_the_hub_is_continued_in_its_output_dir(tiny_model_dir, packed_mixture, tmp_path):
    """The Trainer's pushes write model files into output_dir (each checkpoint push, and the final push saves the
    model there again): they are the run's own, so the same run continued with more steps is not refused; the
    card the user edits afterwards is the user's, and the next final save would replace it: refused."""
    from hub_server import FakeHub
    from test_secrets import HUB_TOKEN, _cpt_args, _run

    out = tmp_path / "cpt"
    with FakeHub(token=HUB_TOKEN) as hub:
        _run("run_cpt.py", _cpt_args(tiny_model_dir, packed_mixture, out), hub, tmp_path / "home")
        _run("run_cpt.py", _cpt_args(tiny_model_dir, packed_mixture, out, "--max_steps", "3"), hub, tmp_path / "home")
    assert sorted(logged_losses(out)) == [1, 2, 3]
    with open(out / "README.md", "a") as f:
        f.write("Evaluated by hand: fine.\n")
    with pytest.raises(RecipeError, match=r"^output_dir: .* holds README.md, which no save of this run wrote \(or which "
                                          r"changed since\)"):
        cpt_main(cpt_argv(tiny_model_dir, packed_mixture, out, max_steps=4, save_steps=1))
    assert (out / "README.md").read_text().endswith("Evaluated by hand: fine.\n")
