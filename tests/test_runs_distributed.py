"""run_cpt.py and run_sft.py under torchrun (gloo, CPU): 2-process DDP and 2-way sequence parallelism
must give the loss curve of one process with the same global batch, and resumed runs (also on another
process count) must continue it."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import cpt_argv as _argv, launch, logged_losses as _losses

pytestmark = pytest.mark.slow  # torchrun runs of the CLIs (make test-fast skips them)


def _assert_same_curve(losses, reference):
    # step 1 is before any update: equal up to float summation order. Later steps go through
    # AdamW, whose normalisation amplifies rounding in near-zero gradients a little.
    assert sorted(losses) == sorted(reference)
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5 if step == 1 else 2e-4), step


def _run(argv, processes: int):
    launch("prolong/run_cpt.py", *argv, processes=processes)


@pytest.fixture(scope="module")
def single_process_run(tiny_model_dir, packed_mixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    _run(_argv(tiny_model_dir, packed_mixture, out, max_steps=3, per_device_train_batch_size=2), 1)
    return out  # checkpoints at steps 2 and 3


@pytest.fixture(scope="module")
def single_process_losses(single_process_run):
    return _losses(single_process_run)


def test_two_process_ddp_equals_one_process(tiny_model_dir, packed_mixture, tmp_path, single_process_losses):
    out = tmp_path / "ddp"
    _run(_argv(tiny_model_dir, packed_mixture, out, max_steps=3, per_device_train_batch_size=1), 2)
    _assert_same_curve(_losses(out), single_process_losses)


@pytest.mark.parametrize("micro_batch, accumulation", [(2, 1), (1, 2)])
def test_two_way_sequence_parallel_equals_one_process(
    micro_batch, accumulation, tiny_model_dir, packed_mixture, tmp_path, single_process_losses
):
    """Same global batch (2 rows per step); with accumulation the step's token count must span
    both micro-batches' chunks, which carry shift_labels but no labels."""
    out = tmp_path / "sp"
    argv = _argv(tiny_model_dir, packed_mixture, out, max_steps=3, per_device_train_batch_size=micro_batch,
                 gradient_accumulation_steps=accumulation, sequence_parallel_size=2)
    _run(argv, 2)
    _assert_same_curve(_losses(out), single_process_losses)
    with open(os.path.join(out, "config.json")) as f:
        assert "ulysses" not in json.dumps(json.load(f))  # the saved model loads with plain attention


def test_sequence_parallel_run_resumes_without_repeating_data(tiny_model_dir, packed_mixture, tmp_path):
    """Stage 2's mode: a 2-way sequence-parallel run resumed from its step-2 checkpoint continues
    the uninterrupted loss curve (the SP data loader skips exactly the batches already trained)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run(_argv(tiny_model_dir, packed_mixture, full, sequence_parallel_size=2), 2)  # 4 steps, saves at 2 and 4
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    _run(_argv(tiny_model_dir, packed_mixture, resumed, sequence_parallel_size=2, resume_from_checkpoint="true"), 2)
    reference, losses = _losses(full), _losses(resumed)
    assert sorted(losses) == sorted(reference) == [1, 2, 3, 4]
    for step in (3, 4):  # trained after the resume; a repeated batch would change them
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), step


def test_resume_on_a_different_number_of_processes_keeps_the_data_position(
    tiny_model_dir, packed_mixture, tmp_path, single_process_run, single_process_losses
):
    """A run checkpointed by 1 process continues on 2 (same global batch): the mixture is a flat
    sequence dealt round-robin, so the position after step N is N x global batch either way."""
    resumed = tmp_path / "two"
    shutil.copytree(single_process_run / "checkpoint-2", resumed / "checkpoint-2")
    _run(_argv(tiny_model_dir, packed_mixture, resumed, max_steps=3, save_steps=2, per_device_train_batch_size=1,
               resume_from_checkpoint="true"), 2)
    _assert_same_curve(_losses(resumed), single_process_losses)


def test_two_process_sft_equals_one_process(tiny_model_dir, tmp_path):
    """SFT (TRL's SFTTrainer, conversations packed whole): 2 processes x 1 packed row == 1 process x 2
    rows; the loss is the token mean of the whole step over both devices."""
    from helpers import chat_conversations as _conversations, sft_argv as _run_args, write_chat_jsonl as _write_chat_jsonl

    data = _write_chat_jsonl(tmp_path / "chat.jsonl", _conversations(32, seed=3))

    def sft(out, processes, per_device):
        argv = _run_args(tiny_model_dir, data, str(out), "--max_steps", "3", "--logging_steps", "1",
                         "--max_length", "64", "--learning_rate", "1e-3")
        argv[argv.index("--per_device_train_batch_size") + 1] = str(per_device)
        launch("prolong/run_sft.py", *argv, processes=processes)
        return _losses(out)

    _assert_same_curve(sft(tmp_path / "ddp", 2, 1), sft(tmp_path / "one", 1, 2))


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tiny_model_dir, packed_mixture, tmp_path):
    """Preemption signals reach the ranks at different moments: a rank stopping alone would leave
    the others waiting in a collective forever (the run would hang, not fail)."""
    out = tmp_path / "preempted"
    argv = _argv(tiny_model_dir, packed_mixture, out, max_steps=6, save_steps=100, per_device_train_batch_size=1)
    launch("tests/distributed/preempt_worker.py", *argv, processes=2, timeout=120)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "config.json").exists()  # stopped early: no final model, resume from the checkpoint
