"""Crash and resume tests of run_cpt (prolong/checkpoint/checkpoints.py, prolong/checkpoint/final_save.py): a run killed at
any point and started again with the same command, a power loss that truncated the newest
checkpoint, a resume with another global_batch_size, a kill at every step of the final save, and
verified state: a checkpoint with flipped bytes or an edited marker, or continued by another run (model,
tokenizer, data, step; prolong/checkpoint/identity.py), is refused, naming what changed.

Each compares with one uninterrupted run (6 steps of 2 sequences, checkpoints at 2, 4, 6): the
resumed run must give its loss curve (a repeated or skipped sequence would change it) or, with
another batch size, feed the model exactly the sequences after the checkpoint's position in the
same stream. SIGTERM/SIGUSR1 preemption is tested in test_cpt.py and test_runs_distributed.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from prolong.checkpoint.checkpoints import MARKER, last_checkpoint
from prolong.config import RecipeError
from prolong.training.mixture import MixtureDataset
from prolong.run_cpt import main
from helpers import cpt_argv as _argv, logged_losses as _losses

pytestmark = pytest.mark.slow  # runs trained, killed and resumed (make test-fast skips them)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = dict(max_steps=6, save_steps=2, per_device_train_batch_size=2)


def _assert_same_curve(losses, reference, steps=range(1, 7)):
    assert sorted(losses) == sorted(reference) == list(steps)
    for step in steps:
        assert losses[step] == pytest.approx(reference[step], rel=1e-4), step


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, packed_mixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    main(_argv(tiny_model_dir, packed_mixture, out, **RUN))
    return out


def test_a_killed_run_started_again_with_the_same_command_continues_it(
    tiny_model_dir, packed_mixture, uninterrupted, tmp_path, caplog
):
    """`python prolong/run_cpt.py ...` SIGKILLed (no handler runs) as soon as checkpoint-4
    appears, i.e. during its save or just after; the same command line again, with no resume
    flag, continues from the newest complete checkpoint and ends with the uninterrupted loss
    curve and model. (The second run goes through run_cpt's main in this process: one Python
    start-up less.)"""
    out = tmp_path / "run"
    argv = _argv(tiny_model_dir, packed_mixture, out, **RUN)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    first = subprocess.Popen([sys.executable, "prolong/run_cpt.py", *argv], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-4").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    first.kill()
    _, stderr = first.communicate()
    assert first.returncode == -signal.SIGKILL, stderr[-3000:]
    assert not (out / "config.json").exists()

    with caplog.at_level("INFO", logger="prolong.checkpoint.checkpoints"):
        main(argv)
    assert "(the newest complete checkpoint)" in caplog.text
    _assert_same_curve(_losses(out), _losses(uninterrupted))
    for step in (2, 4, 6):
        assert (out / f"checkpoint-{step}" / MARKER).exists()
    for name, weight in _weights(uninterrupted).items():
        torch.testing.assert_close(_weights(out)[name], weight, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("damage", ["optimizer.pt", "trainer_state.json", MARKER])
def test_a_damaged_newest_checkpoint_is_skipped_with_its_reason(uninterrupted, tmp_path, caplog, damage):
    """Power loss before the file system flushed checkpoint-4 (a file left with 0 bytes), or a save
    cut short before its marker: resume takes checkpoint-2 and says why it skipped checkpoint-4."""
    for step in (2, 4):
        shutil.copytree(uninterrupted / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    target = tmp_path / "checkpoint-4" / damage
    if damage == MARKER:
        target.unlink()
    else:
        target.write_bytes(b"")
    with caplog.at_level("WARNING", logger="prolong.checkpoint.checkpoints"):
        assert last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    expected = f"no {MARKER}" if damage == MARKER else f"{damage} has 0 bytes"
    assert any("checkpoint-4" in r.message and expected in r.message for r in caplog.records), caplog.text


def test_resume_after_a_power_loss_gives_the_uninterrupted_curve(
    tiny_model_dir, packed_mixture, uninterrupted, tmp_path, caplog
):
    """End to end: checkpoint-6's optimizer.pt truncated to 0 bytes; `--resume_from_checkpoint
    true` continues from checkpoint-4 (two steps: the damaged checkpoint-6 is replaced, not mixed).
    With save_total_limit 2 the rotation, which runs once a checkpoint is complete, keeps the two
    newest complete checkpoints (an incomplete checkpoint-8 takes no place among them)."""
    out = tmp_path / "run"
    for step in (2, 4, 6):
        shutil.copytree(uninterrupted / f"checkpoint-{step}", out / f"checkpoint-{step}")
    (out / "checkpoint-6" / "optimizer.pt").write_bytes(b"")
    shutil.copytree(uninterrupted / "checkpoint-6", out / "checkpoint-8")  # a save cut short before its marker
    (out / "checkpoint-8" / MARKER).unlink()
    kept = _CheckpointsAfterEachSave()
    with caplog.at_level("INFO", logger="prolong.checkpoint.checkpoints"):
        main(_argv(tiny_model_dir, packed_mixture, out, save_total_limit=2, resume_from_checkpoint="true", **RUN),
             callbacks=[kept])
    assert f"Resuming from {out / 'checkpoint-4'}" in caplog.text
    _assert_same_curve(_losses(out), _losses(uninterrupted))
    assert kept.listings == {6: ["checkpoint-4", "checkpoint-6"]}
    assert last_checkpoint(str(out)) == str(out / "checkpoint-6")


class _CheckpointsAfterEachSave(TrainerCallback):
    def __init__(self):
        self.listings = {}

    def on_save(self, args, state, control, **kwargs):
        self.listings[state.global_step] = sorted(p for p in os.listdir(args.output_dir) if p.startswith("checkpoint-"))


class _RecordModelInputs(TrainerCallback):
    """The token ids every forward of the training loop received, in order."""

    def __init__(self):
        self.tokens = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_pre_hook(
            lambda module, a, kw: self.tokens.extend(kw["input_ids"].reshape(-1).tolist()), with_kwargs=True
        )


def test_resume_with_another_global_batch_size_continues_at_the_next_unseen_sequence(
    tiny_model_dir, packed_mixture, uninterrupted, tmp_path
):
    """checkpoint-2 consumed sequences 0-3 (2 per step). Resumed with global_batch_size 4 for one
    more step, the model must see exactly sequences 4-7 of the same stream (the Trainer's own
    skipping would start at 2 steps x 4 = sequence 8: 4 skipped)."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoint-2", out / "checkpoint-2")
    recorder = _RecordModelInputs()
    main(_argv(tiny_model_dir, packed_mixture, out, max_steps=3, save_steps=1, per_device_train_batch_size=2,
               global_batch_size=4), callbacks=[recorder])
    stream = MixtureDataset(packed_mixture, 128, num_sequences=100, seed=42)
    expected = [token for index in range(4, 8) for token in stream[index]["input_ids"]]
    assert recorder.tokens == expected
    with open(out / "checkpoint-3" / MARKER) as f:
        record = json.load(f)
    assert (record["sequences_consumed"], record["sequences_per_step"]) == (8, 4)


def test_resume_with_another_seed_or_mixture_is_refused(tiny_model_dir, packed_mixture, uninterrupted, tmp_path):
    """The checkpoint's position (4 sequences) is a position in the stream of its seed and mixture:
    continued in another stream it would repeat some sequences and skip others."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoint-2", out / "checkpoint-2")
    with pytest.raises(RecipeError, match=r"^seed: the checkpoint at step 2 .*seed=42.* seed=43.*overwrite_output_dir"):
        main(_argv(tiny_model_dir, packed_mixture, out, seed=43, **RUN))
    shares = dict(zip(packed_mixture, (0.5, 0.5)))
    with pytest.raises(RecipeError, match=r"^dataset_mixture: the checkpoint at step 2"):
        main(_argv(tiny_model_dir, shares, out, **RUN))


def test_an_output_dir_with_checkpoints_is_continued_or_overwritten_never_mixed(
    tiny_model_dir, packed_mixture, uninterrupted, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoint-4", out / "checkpoint-4")
    with pytest.raises(RecipeError, match="already holds checkpoint-4.*resume_from_checkpoint: auto.*overwrite_output_dir"):
        main(_argv(tiny_model_dir, packed_mixture, out, resume_from_checkpoint="none", **RUN))
    main(_argv(tiny_model_dir, packed_mixture, out, overwrite_output_dir="true", max_steps=1, save_steps=1,
               per_device_train_batch_size=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # checkpoint-4 of the old run is gone
    assert sorted(_losses(out)) == [1]


def test_the_same_command_after_a_finished_run_reports_it_and_trains_nothing(
    tiny_model_dir, packed_mixture, uninterrupted, tmp_path, caplog
):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    with caplog.at_level("WARNING"):
        assert main(_argv(tiny_model_dir, packed_mixture, out, **RUN)) == str(out)
    assert "already holds the final model of this run (step 6, max_steps 6)" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before  # nothing rewritten
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


class _Killed(BaseException):
    """Stands for SIGKILL at one point of the final save: nothing may catch it or clean up."""


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_a_kill_at_any_point_of_the_final_save_leaves_the_old_or_the_new_model(
    tiny_model_dir, packed_mixture, tmp_path, monkeypatch, swap
):
    """output_dir holds a model and a checkpoint; the final save of a new model is stopped at
    each file-system call in turn (every rename, link, removal, ...). from_pretrained(output_dir)
    must then load exactly the old or the new model (with the atomic swap: at once; where the
    file system cannot swap: once the next run's start-up recovery has run), the checkpoint must
    still be there, and the next final save must publish the new model."""
    import prolong.checkpoint.final_save as outputs
    from prolong.checkpoint.final_save import recover_final_save, save_final_model
    from helpers import cpt_trainer as _trainer

    trainer = _trainer(tiny_model_dir, packed_mixture, tmp_path / "out", per_device_train_batch_size=1, max_steps=1)
    trainer.train()
    new = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    old = _weights(tiny_model_dir)
    template = tmp_path / "template"
    shutil.copytree(tiny_model_dir, template)
    (template / "checkpoint-1").mkdir()
    (template / "checkpoint-1" / "optimizer.pt").write_bytes(b"state")
    if swap == "two renames":
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)

    calls = {"count": 0, "kill_at": None}

    def killable(function):
        def call(*args, **kwargs):
            calls["count"] += 1
            if calls["count"] == calls["kill_at"]:
                raise _Killed(function.__name__)
            return function(*args, **kwargs)
        return call

    for module, name in ((os, "rename"), (os, "replace"), (os, "remove"), (os, "unlink"), (os, "link"),
                         (shutil, "rmtree"), (shutil, "copy2"), (outputs, "_exchange")):
        monkeypatch.setattr(module, name, killable(getattr(module, name)))

    def final_save():
        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
        calls["count"] = 0
        shutil.copytree(template, trainer.args.output_dir)
        calls["count"] = 0
        save_final_model(trainer, base_model="tiny", stage="continued-pretraining", recipe={}, max_length=128)

    calls["kill_at"] = None
    final_save()
    points = calls["count"]
    assert points >= 4
    out = trainer.args.output_dir
    for kill_at in range(1, points + 1):
        calls["kill_at"] = kill_at
        with pytest.raises(_Killed):
            final_save()
        calls["kill_at"] = None
        if swap == "two renames":
            recover_final_save(out)
        loaded = _weights(out)
        assert any(all(torch.equal(loaded[k], w[k]) for k in w) for w in (old, new)), f"killed at call {kill_at}"
        assert open(os.path.join(out, "checkpoint-1", "optimizer.pt"), "rb").read() == b"state", kill_at
        save_final_model(trainer, base_model="tiny", stage="continued-pretraining", recipe={}, max_length=128)
        loaded = _weights(out)
        assert all(torch.equal(loaded[k], new[k]) for k in new), kill_at
        assert sorted(os.listdir(os.path.dirname(out))) == sorted(["out", "template"]), kill_at


def test_a_requeued_slurm_job_resumes(tmp_path):
    """scripts/slurm_launch.sh under stand-in `srun` / `scontrol` / `accelerate` commands: the
    training command every node runs asks for the newest complete checkpoint (a requeued job runs
    the same command), and flags given after the recipe still override it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\necho node2\n")
    (bin_dir / "srun").write_text('#!/bin/bash\nshift\nSLURM_PROCID=0 "$@"\n')  # drop --kill-on-bad-exit
    (bin_dir / "accelerate").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/launched\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_NODELIST="node[1-2]",
               SLURM_NNODES="2", SLURM_JOB_ID="7", PYTHON_ENV=str(tmp_path / "none"))
    script = os.path.join(REPO, "scripts", "slurm_launch.sh")
    result = subprocess.run(["bash", script, "recipes/prolong-8b/stage1.yaml", "--max_steps", "9"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    launched = (tmp_path / "launched").read_text().split("\n")
    script_at = launched.index("prolong/run_cpt.py")
    assert launched[script_at + 1:script_at + 6] == [
        "recipes/prolong-8b/stage1.yaml", "--resume_from_checkpoint", "auto", "--max_steps", "9"]
    from prolong.config import CPTConfig, DataConfig, ModelConfig, parse_recipe

    *_, args = parse_recipe((ModelConfig, DataConfig, CPTConfig), [os.path.join(REPO, "recipes/prolong-8b/stage1.yaml")])
    assert args.resume_from_checkpoint == "auto"  # the recipe says the same, for launches without the script


def test_preempted_sft_resumes_with_its_curve_and_refuses_another_global_batch_size(tiny_model_dir, tmp_path):
    """run_sft stopped by SIGUSR1 at step 2 saves checkpoint-2 and no final model; the same command
    again continues it with the uninterrupted loss curve. TRL's data order is a seeded shuffle
    that the Trainer's resume skips by steps of the new batch size, so another global_batch_size
    would repeat or skip conversations: it is refused, naming the field and the checkpoint's value."""
    from prolong.run_sft import main as sft_main
    from helpers import PreemptAt as _PreemptAt, chat_conversations as _conversations, sft_argv as _run_args, \
        write_chat_jsonl as _write_chat_jsonl

    data = _write_chat_jsonl(tmp_path / "chat.jsonl", _conversations(24, seed=1))
    steps = ("--save_strategy", "steps", "--save_steps", "100", "--logging_steps", "1", "--max_steps", "4")
    reference = _losses(sft_main(_run_args(tiny_model_dir, data, str(tmp_path / "full"), *steps)))
    out = str(tmp_path / "sft")
    sft_main(_run_args(tiny_model_dir, data, out, *steps), callbacks=[_PreemptAt(2)])
    assert os.path.exists(os.path.join(out, "checkpoint-2", MARKER)) and not os.path.exists(os.path.join(out, "config.json"))
    with pytest.raises(RecipeError, match=r"global_batch_size: .*\(2 per step\), this run takes 4 per step.*global_batch_size: 2"):
        sft_main(_run_args(tiny_model_dir, data, out, *steps, "--global_batch_size", "4"))
    sft_main(_run_args(tiny_model_dir, data, out, *steps))
    _assert_same_curve(_losses(out), reference, steps=range(1, 5))


def test_balanced_order_resumed_at_any_position_balances_exactly_the_unseen_sequences(packed_mixture):
    """balance_attention_cost reorders each step's sequences; resumed at sequence 6 with steps of
    4, the first two steps hold exactly sequences 6-13 of the stream (in balanced order)."""
    from prolong.training.mixture import BalancedOrder

    stream = MixtureDataset(packed_mixture, 128, num_sequences=40, seed=42)
    balanced = BalancedOrder(MixtureDataset(packed_mixture, 128, num_sequences=40, seed=42), 2, 1, 2)
    balanced.start_at(6)
    for step in range(2):
        seen = sorted(tuple(balanced[step * 4 + i]["input_ids"]) for i in range(4))
        assert seen == sorted(tuple(stream[6 + step * 4 + i]["input_ids"]) for i in range(4)), step


# -- verified state: content digests, the run's identity, the step (prolong/checkpoint/identity.py) ----------------
def _flip_a_byte(path, at=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["optimizer.pt", "model.safetensors", "trainer_state.json"])
def test_a_checkpoint_with_flipped_bytes_is_refused_naming_the_file_and_the_way_out(
    tiny_model_dir, packed_mixture, uninterrupted, tmp_path, caplog, damaged
):
    """Sizes intact, one byte flipped (disk damage, a bad copy, an edit): the resume refuses before loading
    anything; removing the damaged checkpoint, as the message says, resumes from the one before."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    _flip_a_byte(out / "checkpoint-6" / damaged)
    argv = _argv(tiny_model_dir, packed_mixture, out, **dict(RUN, max_steps=8))
    with pytest.raises(RecipeError, match=rf"^resume_from_checkpoint: .*checkpoint-6: {damaged} differs from what was "
                                          r"written at step 6 .*Remove checkpoint-6"):
        main(argv)
    shutil.rmtree(out / "checkpoint-6")
    with caplog.at_level("INFO", logger="prolong.checkpoint.checkpoints"):
        main(argv)
    assert f"Resuming from {out / 'checkpoint-4'}" in caplog.text
    assert sorted(_losses(out)) == list(range(1, 9))


def _other_model(tiny_model_dir, path):
    from transformers import LlamaForCausalLM

    shutil.copytree(tiny_model_dir, path)
    torch.manual_seed(1)
    LlamaForCausalLM(AutoModelForCausalLM.from_pretrained(tiny_model_dir).config).save_pretrained(path)
    return str(path)


def _other_tokenizer(tiny_model_dir, path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("change", ["model", "tokenizer", "checkpoint renamed", "marker edited"])
def test_resume_by_another_run_is_refused_naming_what_changed(
    tiny_model_dir, packed_mixture, uninterrupted, tmp_path, change
):
    """A finished run's output_dir (or a checkpoint in it) continued with max_steps raised: another model,
    another tokenizer, a checkpoint whose name no longer matches its step, or a marker edited to another data
    position is refused before loading."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    values, expected = dict(RUN, max_steps=8), None
    if change == "model":
        values["model_name_or_path"] = _other_model(tiny_model_dir, tmp_path / "other-model")
        expected = r"^model_name_or_path: output_dir .* holds a run of other inputs: model_name_or_path was " \
                   r".*tiny-llama.*, this run has .*other-model"  # its tokenizer files are the same: not named
    elif change == "tokenizer":
        values["tokenizer_name_or_path"] = _other_tokenizer(tiny_model_dir, tmp_path / "other-tokenizer")
        expected = r"^tokenizer_name_or_path: .*tokenizer \(tokenizer_name_or_path.* this run has .*other-tokenizer"
    elif change == "marker edited":
        marker = out / "checkpoint-6" / MARKER
        marker.write_text(marker.read_text().replace('"sequences_consumed": 12', '"sequences_consumed": 10'))
        expected = rf"^resume_from_checkpoint: .*checkpoint-6: {MARKER} was edited after it was written"
    else:
        (out / "checkpoint-6").rename(out / "checkpoint-8")
        expected = r"^resume_from_checkpoint: .*checkpoint-8 disagrees on its step \(checkpoint_complete.json: 6, " \
                   r"trainer_state.json: 6, its name: 8\)"
    with pytest.raises(RecipeError, match=expected):
        main(_argv(tiny_model_dir, packed_mixture, out, **values))
    assert sorted(_losses(out)) == list(range(1, 7))  # nothing trained, nothing rewritten


def test_a_moved_model_is_the_same_input_and_rebuilt_data_is_not(tiny_model_dir, packed_mixture, tmp_path):
    """Inputs are compared by content: the same model at another path continues the run; a dataset rebuilt
    at the same path with other documents is refused, naming the path."""
    from conftest import random_documents, write_packed_dataset

    data = {str(shutil.copytree(path, tmp_path / "data" / os.path.basename(path))): share
            for path, share in packed_mixture.items()}
    out = tmp_path / "run"
    main(_argv(tiny_model_dir, data, out, max_steps=2, save_steps=1, per_device_train_batch_size=2))
    moved = shutil.copytree(tiny_model_dir, tmp_path / "moved-model")
    main(_argv(str(moved), data, out, max_steps=3, save_steps=1, per_device_train_batch_size=2))
    assert sorted(_losses(out)) == [1, 2, 3]
    short = next(path for path in data if path.endswith("short"))
    shutil.rmtree(short)
    write_packed_dataset(short, random_documents(200, 300, 5, 40, 7), 128, "short")
    with pytest.raises(RecipeError, match=rf"^dataset_mixture: output_dir .* dataset_mixture path {short} has other "
                                          r"content now \(rebuilt .*overwrite_output_dir: true"):
        main(_argv(str(moved), data, out, max_steps=4, save_steps=1, per_device_train_batch_size=2))


def test_sft_resumed_on_a_rebuilt_dataset_is_refused(tiny_model_dir, tmp_path):
    from prolong.run_sft import main as sft_main
    from helpers import chat_conversations, sft_argv, write_chat_jsonl

    data = write_chat_jsonl(tmp_path / "chat.jsonl", chat_conversations(16, seed=1))
    out = str(tmp_path / "sft")
    sft_main(sft_argv(tiny_model_dir, data, out, "--save_strategy", "steps", "--save_steps", "1", "--max_steps", "1"))
    write_chat_jsonl(tmp_path / "chat.jsonl", chat_conversations(16, seed=2))
    with pytest.raises(RecipeError, match=r"^dataset_name: .* dataset_name .*chat.jsonl has other content now"):
        sft_main(sft_argv(tiny_model_dir, data, out, "--save_strategy", "steps", "--save_steps", "1"))
