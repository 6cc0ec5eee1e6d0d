"""Helpers that several test modules share (fixtures live in conftest.py): CPT/SFT command lines,
the logged losses of a run, a CPT trainer over a mixture, a preemption callback, chat data."""

from __future__ import annotations

import json
import os
import random
import signal

from conftest import WORDS
from transformers import TrainerCallback


def cpt_argv(model_dir, mixture, output_dir, **overrides) -> list[str]:
    """run_cpt flags for a few CPU steps of the tiny model on `mixture`; `overrides` as --key value."""
    values = dict(
        model_name_or_path=model_dir,
        dataset_mixture=json.dumps(mixture),
        max_length=128,
        per_device_train_batch_size=2,
        max_steps=4,
        save_steps=2,
        learning_rate=1e-3,
        output_dir=str(output_dir),
        report_to="none",
        disable_tqdm="true",
    )
    values.update(overrides)
    argv = []
    for key, value in values.items():
        argv += [f"--{key}", str(value)]
    return argv


def train_log(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        return json.load(f)["log_history"]


def logged_losses(output_dir) -> dict[int, float]:
    """step -> training loss, from the run's (or checkpoint's) trainer_state.json."""
    return {entry["step"]: entry["loss"] for entry in train_log(output_dir) if "loss" in entry}


def cpt_trainer(model_dir, mixture, output_dir, **args):
    """A CPTTrainer over 8 sequences of `mixture` at 128 tokens, without run_cpt around it."""
    from transformers import AutoModelForCausalLM

    from prolong.collator import PackedCollator
    from prolong.config import CPTConfig
    from prolong.data.mixture import MixtureDataset
    from prolong.trainer import CPTTrainer

    config = CPTConfig(
        output_dir=str(output_dir), report_to="none", save_strategy="no", disable_tqdm=True, **args
    )
    dataset = MixtureDataset(mixture, 128, num_sequences=8, seed=3)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return CPTTrainer(model=model, args=config, train_dataset=dataset, data_collator=PackedCollator())


class PreemptAt(TrainerCallback):
    """Sends SIGUSR1 to this process at a given step, as a cluster scheduler would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat_conversations(n, seed=0, turns=2) -> list[list[dict]]:
    """`n` random conversations (half with a system message) of `turns` user/assistant turns."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(n):
        messages = [{"role": "system", "content": sentence(rng, 4)}] if rng.random() < 0.5 else []
        for _ in range(turns):
            messages += [{"role": "user", "content": sentence(rng, rng.randint(2, 12))},
                         {"role": "assistant", "content": sentence(rng, rng.randint(1, 15))}]
        conversations.append(messages)
    return conversations


def write_chat_jsonl(path, conversations) -> str:
    with open(path, "w") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


def sft_argv(model_dir, data, out, *extra) -> list[str]:
    """run_sft flags for two CPU steps of the tiny model on `data`."""
    return ["--model_name_or_path", model_dir, "--dataset_name", data, "--output_dir", out,
            "--max_length", "128", "--per_device_train_batch_size", "2", "--max_steps", "2",
            "--learning_rate", "1e-2", "--use_cpu", "true", "--report_to", "none",
            "--activation_checkpointing", "false", "--save_strategy", "no", "--attn_implementation", "sdpa", *extra]
