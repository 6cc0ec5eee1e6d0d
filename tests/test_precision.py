"""The optimizer never steps bf16 master weights unless the recipe asks for it by name
(prolong/training/precision.py), shown through run_cpt at ProLong's learning rate."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import cpt_argv
from safetensors.torch import load_file

from prolong.config import CPTConfig, RecipeError
from prolong.run_cpt import main
from prolong.training.precision import reduce_gradients_in_fp32, rounded_away_share

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = dict(learning_rate=1e-5, warmup_steps=0, max_steps=1, save_steps=10)  # one full-size AdamW step


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(f"{path}/model.safetensors")


def _norms(weights) -> dict[str, torch.Tensor]:
    return {name: w for name, w in weights.items() if "norm" in name}


def test_bf16_weights_without_fsdp2_are_refused_before_loading(tiny_model_dir, packed_mixture, tmp_path):
    with pytest.raises(RecipeError, match=r"dtype: bfloat16 .*fp32 copy.*dtype: auto.*low_precision_master_weights"):
        main(cpt_argv(tiny_model_dir, packed_mixture, tmp_path / "run", dtype="bfloat16", **LR))
    assert not (tmp_path / "run").exists()


def test_auto_trains_fp32_master_weights_and_every_norm_weight_moves(tiny_model_dir, packed_mixture, tmp_path):
    out = main(cpt_argv(tiny_model_dir, packed_mixture, tmp_path / "run", **LR))
    before, after = _weights(tiny_model_dir), _weights(out)
    assert all(w.dtype == torch.float32 for w in after.values())
    for name, weight in _norms(after).items():
        assert (weight != before[name]).all(), name


def test_opt_in_trains_bf16_and_its_log_states_what_a_step_loses(tiny_model_dir, packed_mixture, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="prolong.training.precision"):
        out = main(cpt_argv(tiny_model_dir, packed_mixture, tmp_path / "run", dtype="bfloat16",
                            low_precision_master_weights="true", **LR))
    before = {name: w.to(torch.bfloat16) for name, w in _weights(tiny_model_dir).items()}
    after = _weights(out)
    assert all(w.dtype == torch.bfloat16 for w in after.values())
    # the cost the log announces is real: norm weights (1.0) cannot take a 1e-5 step in bf16
    for name, weight in _norms(after).items():
        assert torch.equal(weight, before[name]), name
    unchanged = sum(int((after[n] == before[n]).sum()) for n in after) / sum(w.numel() for w in after.values())
    predicted, frozen, tensors = rounded_away_share(
        [w.clone().requires_grad_(True) for w in before.values()], LR["learning_rate"])
    assert unchanged >= predicted > 0.5 and frozen >= len(_norms(after))
    assert f"cannot change {100 * predicted:.1f}% of this model's weights" in caplog.text


def test_rounded_away_share_matches_a_real_bf16_adamw_step():
    torch.manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(4096) * 0.02).to(torch.bfloat16))
    norm = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    share, frozen, tensors = rounded_away_share([weight, norm], 1e-5)
    before = weight.detach().clone()
    weight.grad, norm.grad = torch.randn_like(weight), torch.randn_like(norm)
    torch.optim.AdamW([weight, norm], lr=1e-5, weight_decay=0.0).step()
    measured = (weight.detach() == before).float().mean().item()
    assert abs((share * (4096 + 64) - 64) / 4096 - measured) < 0.01  # share counts the norm's 64 too
    assert (frozen, tensors) == (1, 2) and (norm == 1).all()


def _run_cpt_on(machine: str, *argv: str) -> subprocess.CompletedProcess:
    """prolong/run_cpt.py as a user starts it, on an emulated machine (tests/emulated_machine)."""
    env = dict(os.environ, PROLONG_EMULATE=machine,
               PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests", "emulated_machine"), REPO]))
    return subprocess.run([sys.executable, os.path.join(REPO, "prolong", "run_cpt.py"), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two CLI processes
@pytest.mark.parametrize("recipe", ["recipes/smollm2-135m/cpt.yaml", "recipes/prolong-8b/stage1.yaml"])
def test_a_gpu_recipe_on_a_cuda_build_without_a_working_gpu_is_refused_before_loading(recipe, tmp_path):
    result = _run_cpt_on("broken-cuda", recipe, "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "bf16: true needs a GPU" in result.stderr and "use_cpu: true" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a CLI process
def test_liger_asked_for_but_not_installed_is_refused_before_loading(tmp_path):
    assert importlib.util.find_spec("liger_kernel") is None  # as on this CPU machine
    result = _run_cpt_on("cuda", "recipes/smollm2-135m/cpt.yaml", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "liger-kernel is not installed" in result.stderr and "use_liger_kernel: false" in result.stderr


@pytest.mark.parametrize("launch", [{"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
                                    {"ACCELERATE_USE_DEEPSPEED": "true",
                                     "ACCELERATE_DEEPSPEED_CONFIG_FILE": "accelerate_configs/ds_zero3.json"}])
def test_recall_evaluation_under_sharded_weights_is_refused_at_start(launch, monkeypatch, tmp_path):
    """Generation on rank 0 alone would all-gather sharded weights the other ranks never gather: a hang."""
    monkeypatch.chdir(REPO)
    for key, value in launch.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RecipeError, match="eval_recall_lengths runs generation on the main process alone"):
        CPTConfig(output_dir=str(tmp_path / "out"), eval_recall_lengths=[512])
    for key in launch:
        monkeypatch.delenv(key)
    CPTConfig(output_dir=str(tmp_path / "out"), eval_recall_lengths=[512])  # one process: fine


def test_fsdp2_bf16_policy_reduces_gradients_in_fp32():
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")  # what accelerate does for mixed_precision: bf16
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16
    reduce_gradients_in_fp32(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)


def _launch_environment(recipe: str) -> dict[str, str]:
    """What `accelerate launch --config_file X` (named in the recipe's header) puts in the environment."""
    text = open(os.path.join(REPO, recipe)).read()
    match = re.search(r"accelerate launch --config_file (\S+)", text)
    if not match:
        return {}
    config = yaml.safe_load(open(os.path.join(REPO, match.group(1))))
    if config.get("distributed_type") != "FSDP":
        return {}
    return {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(config["fsdp_config"]["fsdp_version"])}


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO)) for p in Path(REPO, "recipes").glob("*/*.yaml")
                                          if p.parent.name != "tiny" and not p.name.startswith("data-")))
def test_every_gpu_recipe_launched_as_its_header_says_keeps_fp32_master_weights(recipe, monkeypatch):
    from prolong.config import SFTModelConfig, SFTRecipeConfig
    from prolong.config import DataConfig, ModelConfig, parse_recipe
    from prolong.model import resolve_dtype
    from prolong.training.precision import check_master_weights

    monkeypatch.chdir(REPO)
    sft = "sft" in Path(recipe).name
    types = (SFTModelConfig, SFTRecipeConfig) if sft else (ModelConfig, DataConfig, CPTConfig)
    model_cfg, *_, args = parse_recipe(types, [recipe, "--use_cpu", "true"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU machine the header launches on
    for key, value in _launch_environment(recipe).items():
        monkeypatch.setenv(key, value)
    check_master_weights(resolve_dtype(model_cfg.dtype), args, model_cfg.low_precision_master_weights,
                         lora=getattr(model_cfg, "use_peft", False))
