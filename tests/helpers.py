"""Helpers that several test modules share (fixtures live in conftest.py): CPT/SFT command lines,
the logged losses of a run, a CPT trainer over a mixture, a preemption callback, chat data, the
torchrun launcher, the evaluation tests' tokenizer and model."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys

from conftest import WORDS, bpe_tokenizer, tiny_llama
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

    from prolong.training.collator import PackedCollator
    from prolong.config import CPTConfig
    from prolong.training.mixture import MixtureDataset
    from prolong.training.trainer import CPTTrainer

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


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(script, *args, processes: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `script args` (a path relative to the repository) in `processes` torchrun processes on CPU
    (gloo; 1: a plain `python script`), from the repository; asserts that it exits 0."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # as before the editable install
    result = subprocess.run([*launcher, str(script), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


# ---------------------------------------------------------------------------------------------
# Evaluation: a tokenizer whose corpus holds the recall tasks' words, and a tiny Llama for it

CHAT_TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant\n{% endif %}")


def make_tokenizer():
    corpus = ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
              "One of the special magic numbers for happy-apple is: 1234567. Corresponding value: JSON data",
              "0123456789abcdef-0123456789 Document (Title: Paris): Question: Answer: label: Ranking: ID3 > ID1"] * 30
    tokenizer = bpe_tokenizer(corpus, 600, ["<eos>", "<unk>", "<bos>"], unk_token="<unk>", byte_alphabet=True,
                              bos_token="<bos>", eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(vocab_size: int, window: int = 2048, silent: bool = False):
    """A tiny Llama for `make_tokenizer` (<eos> = 0, <bos> = 2) with a `window`-token context."""
    return tiny_llama(vocab_size, silent=silent, hidden_size=32, intermediate_size=64, max_position_embeddings=window,
                      eos_token_id=0, bos_token_id=2, pad_token_id=0)
