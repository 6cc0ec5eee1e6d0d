"""RoPE settings from the recipe reach transformers' rope_parameters and survive save/load."""

from __future__ import annotations

import logging

import pytest
from conftest import tiny_llama_config
from transformers import AutoConfig, LlamaForCausalLM

from prolong.config import ModelConfig, RecipeError
from prolong.model import apply_rope_settings, load_model


def test_yarn_scaling_round_trips_and_changes_the_frequencies(tmp_path):
    config = tiny_llama_config(320)
    base_inv_freq = LlamaForCausalLM(config).model.rotary_emb.inv_freq.clone()
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    apply_rope_settings(config, None, yarn, max_length=1024)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert reloaded.rope_parameters["rope_type"] == "yarn"
    assert reloaded.rope_parameters["factor"] == 4.0
    assert reloaded.max_position_embeddings == 1024
    assert not (model.model.rotary_emb.inv_freq == base_inv_freq).all()


def test_small_theta_for_the_target_length_is_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="prolong.model"):
        apply_rope_settings(tiny_llama_config(320, max_position_embeddings=8192), 5e5, None, max_length=65536)
    assert "too small" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prolong.model"):
        apply_rope_settings(tiny_llama_config(320, max_position_embeddings=8192), 8e6, None, max_length=65536)
    assert "too small" not in caplog.text


def test_load_model_applies_theta_and_keeps_it_without_override(tiny_model_dir):
    model = load_model(ModelConfig(model_name_or_path=tiny_model_dir, rope_theta=2e6), max_length=512)
    assert model.config.rope_parameters["rope_theta"] == 2e6
    assert model.config._attn_implementation == "sdpa"  # auto on CPU
    untouched = load_model(ModelConfig(model_name_or_path=tiny_model_dir), max_length=128)
    assert untouched.config.rope_parameters["rope_theta"] == 10000.0


@pytest.mark.parametrize("bad", [{"rope_type": "yarn"}, {"rope_type": "no-such-type", "factor": 2.0}])
def test_invalid_rope_scaling_is_refused(bad):
    with pytest.raises(RecipeError, match="rope"):
        apply_rope_settings(tiny_llama_config(320), None, bad, max_length=1024)
