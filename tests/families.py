"""Tiny random models of the families users bring (built from transformers' own config classes, no
download), each keeping what sets its family apart where masking and RoPE live: sliding-window
layers, attention and final-logit soft-capping, QK norms, partial rotary, per-layer-type RoPE, tied
embeddings, attention biases. Shared by tests/test_families.py and its torchrun worker."""

from __future__ import annotations

import copy
import importlib

import torch

VOCAB = 384
WINDOW = 8  # sliding windows far shorter than the test documents, so a window that is ignored shows
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)

# name -> (transformers module, config class, model class, the family's own settings)
FAMILIES = {
    "qwen2.5": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM",  # q/k/v biases, tied (0.5B-3B)
                dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3ForCausalLM",  # q_norm / k_norm before RoPE, tied (0.6B-4B)
              dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "llama-3.x": ("llama", "LlamaConfig", "LlamaForCausalLM",  # Llama-3.1's llama3 RoPE scaling
                  dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("mistral", "MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),  # every layer
    "gemma2": ("gemma2", "Gemma2Config", "Gemma2ForCausalLM",  # alternating local/global, both soft-caps
               dict(sliding_window=WINDOW, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                    query_pre_attn_scalar=16, tie_word_embeddings=True)),
    "gemma3": ("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",  # QK norms, per-layer-type RoPE (4B+: linear 8)
               dict(sliding_window=WINDOW, query_pre_attn_scalar=16, tie_word_embeddings=True,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                     "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})),
    "olmo2": ("olmo2", "Olmo2Config", "Olmo2ForCausalLM", {}),  # QK norms, norms after attention / MLP
    "olmo3": ("olmo3", "Olmo3Config", "Olmo3ForCausalLM",  # sliding layers + full layers
              dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("phi3", "Phi3Config", "Phi3ForCausalLM", dict(sliding_window=WINDOW)),  # Phi-3-mini: a window
    "phi4-mini": ("phi3", "Phi3Config", "Phi3ForCausalLM",  # partial rotary (3/4 of each head), tied
                  dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                  "partial_rotary_factor": 0.75})),
}


def family_config(name: str, **overrides):
    module, config_class, _, settings = FAMILIES[name]
    config_cls = getattr(importlib.import_module(f"transformers.models.{module}"), config_class)
    kwargs = copy.deepcopy({**COMMON, **settings, **overrides})  # configs keep (and RoPE settings edit) these dicts
    if module == "phi3":
        kwargs.pop("head_dim")  # Phi-3 derives it
    return config_cls(**kwargs)


def family_model(name: str, attn: str | None = None, seed: int = 0, **overrides):
    """The family's tiny model with random weights (``seed``), on ``attn`` (default: what auto picks here)."""
    from prolong.training.attention import choose_attn_implementation

    module, _, model_class, _ = FAMILIES[name]
    config = family_config(name, **overrides)
    config._attn_implementation = attn or choose_attn_implementation("auto", config)
    torch.manual_seed(seed)
    model_cls = getattr(importlib.import_module(f"transformers.models.{module}"), model_class)
    return model_cls(config).eval()
