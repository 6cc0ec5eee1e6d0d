"""Regenerate the committed micro-ProLong base model (recipes/tiny/base-model): `python -m
prolong.demo train-base`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prolong.demo.micro_data import (BASE_STAGES, MICRO_WINDOW, build_micro_data, micro_tokenizer_texts,
                                     train_micro_tokenizer)
from prolong.demo.outputs import save_atomically, write_checksums


def micro_base_init(out_dir: str, tokenizer, seed: int = 0, overwrite: bool = False) -> str:
    """The randomly initialised micro model (trained into the base by `train_micro_base`).
    initializer_range 0.08 (about 1/sqrt(hidden)) instead of Llama's 0.02: with 0.02 the attention
    logits start near zero and no retrieval head formed within 1,500 steps (measured)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MICRO_WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        initializer_range=0.08, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return save_atomically(out_dir, overwrite, LlamaForCausalLM(config), tokenizer)


def train_micro_base(out_dir: str, work_dir: str = "demo_data/micro-base-work", steps_scale: float = 1.0) -> str:
    """Train the tokenizer, initialise the model, pack its data and pretrain it with the real CPT
    command (`python -m prolong.run_cpt recipes/tiny/micro-base.yaml`), one run per curriculum
    stage, each starting from the last."""
    import subprocess

    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(work_dir)
    tokenizer = train_micro_tokenizer(micro_tokenizer_texts())
    model = micro_base_init(str(work / "init"), tokenizer, overwrite=True)
    build_micro_data(tokenizer, str(work / "packed"), overwrite=True)
    for length, steps in BASE_STAGES:
        mixture = {str(work / "packed" / f"recall-base-{length}"): 1.0}
        if length == MICRO_WINDOW:  # the full window: man pages too, so the base is a language model
            mixture = {str(work / "packed" / f"short-{length}"): 0.3, str(work / "packed" / f"recall-base-{length}"): 0.7}
        rows = max(8, 8 * MICRO_WINDOW // length)  # about the same tokens per step at every stage
        stage_out = str(work / f"stage-{length}")
        subprocess.run([sys.executable, "-m", "prolong.run_cpt", "recipes/tiny/micro-base.yaml",
                        "--model_name_or_path", model, "--output_dir", stage_out, "--max_length", str(length),
                        "--max_steps", str(max(1, round(steps * steps_scale))), "--dataset_mixture", json.dumps(mixture),
                        "--per_device_train_batch_size", str(rows), "--global_batch_size", str(rows),
                        "--overwrite_output_dir", "true"], check=True)
        model = stage_out
    save_atomically(out_dir, True, AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model))
    write_checksums(out_dir)
    return out_dir
