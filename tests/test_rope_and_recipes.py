"""RoPE settings from the recipe reach transformers' rope_parameters and survive save/load."""

from __future__ import annotations

import logging

import pytest
from conftest import tiny_llama_config
from transformers import AutoConfig, LlamaForCausalLM

from prolong.config import CPTConfig, DataConfig, ModelConfig, parse_recipe
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


@pytest.mark.parametrize("recipe", ["recipes/tiny/cpt.yaml", "recipes/smollm2-135m/cpt.yaml",
                                    "recipes/prolong-8b/stage1.yaml", "recipes/prolong-8b/stage2.yaml"])
def test_cpt_recipes_parse_with_the_papers_numbers(recipe):
    model_cfg, data_cfg, args = parse_recipe((ModelConfig, DataConfig, CPTConfig), [recipe, "--use_cpu", "true"])
    assert abs(sum(data_cfg.dataset_mixture.values()) - 1.0) < 1e-9
    assert (args.adam_beta2, args.weight_decay, args.max_grad_norm, args.warmup_steps) == (0.95, 0.1, 1.0, 0.1)
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    if "stage1" in recipe:  # 64 x 64K = 4M tokens, 5000 steps, theta 8e6
        assert (model_cfg.rope_theta, data_cfg.max_length, args.global_batch_size, args.max_steps) == (
            8e6, 65536, 64, 5000)
        assert args.learning_rate == 1e-5
    if "stage2" in recipe:  # 16 x 512K = 8M tokens, 2500 steps, theta 1.28e8, SP 8, stage-1 hand-off
        assert (model_cfg.rope_theta, data_cfg.max_length, args.global_batch_size, args.max_steps) == (
            1.28e8, 524288, 16, 2500)
        assert args.learning_rate == 5e-6 and args.sequence_parallel_size == 8
        assert args.init_from and args.load_optimizer_state
