"""GPU-only calls, checked on CPU against the installed libraries' signatures (and against stand-ins
with the signatures of the other supported versions): varlen attention, flash-attn through
transformers, Liger's fused loss, TRL's fused loss kernel, FSDP2 through accelerate, save_on_cpu."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prolong.training import compat
from prolong.training.compat import IncompatibleLibraryError, varlen_causal_call

ROOT = Path(__file__).resolve().parents[1]


# torch 2.10's public varlen_attn (torch/nn/attention/varlen.py at v2.10.0)
def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return _reference_varlen(query, key, value, cu_seq_q, causal=is_causal, scale=None)


# torch 2.11/2.12: keyword-only scale and window_size, no enable_gqa
def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), k_cache=None, v_cache=None, cache_seqlens=None):
    return _reference_varlen(query, key, value, cu_seq_q, causal=tuple(window_size) == (-1, 0), scale=scale)


def _reference_varlen(q, k, v, cu, causal, scale):
    """What the CUDA kernel computes, with sdpa per document ([T, heads, dim] layout); no GQA, as in
    the versions without enable_gqa (different head counts fail here)."""
    assert q.shape[1] == k.shape[1], "this torch has no enable_gqa: K/V heads must be repeated"
    out = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        doc = [t[start:end].transpose(0, 1) for t in (q, k, v)]
        out.append(F.scaled_dot_product_attention(*doc, is_causal=causal, scale=scale).transpose(0, 1))
    return torch.cat(out)


def _installed_varlen():
    return importlib.import_module("torch.nn.attention.varlen").varlen_attn


def test_varlen_call_binds_to_the_installed_torch():
    varlen_attn = _installed_varlen()
    kwargs, repeat_kv = varlen_causal_call(varlen_attn, 0.125, 64, num_heads=4, num_kv_heads=2)
    q, k = torch.empty(5, 4, 64), torch.empty(5, 2, 64)
    inspect.signature(varlen_attn).bind(q, k, k, torch.tensor([0, 5]), torch.tensor([0, 5]), 5, 5, **kwargs)
    if "window_size" in inspect.signature(varlen_attn).parameters:
        assert kwargs["window_size"] == (-1, 0) and "is_causal" not in kwargs  # (-1, 0) = causal


@pytest.mark.parametrize("varlen_attn", [varlen_attn_2_10, varlen_attn_2_11], ids=["torch-2.10", "torch-2.11"])
def test_the_varlen_backend_is_causal_per_document_on_every_supported_signature(varlen_attn, monkeypatch):
    """The backend's own code (prolong.training.attention.varlen_attention_forward), run with stand-ins of the
    older signatures: torch 2.10 raised TypeError on window_size before the shim."""
    import torch.nn.attention.varlen as varlen_module

    from prolong.training.attention import varlen_attention_forward

    monkeypatch.setattr(varlen_module, "varlen_attn", varlen_attn)
    torch.manual_seed(0)
    lengths = [5, 9, 2]
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)  # GQA: 4 query heads, 2 K/V
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    out, _ = varlen_attention_forward(None, q, k, v, None, scaling=8**-0.5, position_ids=position_ids)
    start = 0
    for n in lengths:
        doc = [t[:, :, start : start + n] for t in (q, k, v)]
        expected = F.scaled_dot_product_attention(*doc, is_causal=True, enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(out[:, start : start + n], expected)
        start += n


def test_varlen_refuses_what_an_older_torch_cannot_do():
    with pytest.raises(IncompatibleLibraryError, match="no `scale` argument"):
        varlen_causal_call(varlen_attn_2_10, 0.5, 64, 4, 4)  # a model with a non-default attention scale

    def unknown(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, causal_mode="none"):
        pass

    with pytest.raises(IncompatibleLibraryError, match="neither window_size nor is_causal"):
        varlen_causal_call(unknown, None, 64, 4, 4)


class _LigerLoss062:  # liger-kernel >= 0.6.2: LigerFusedLinearCrossEntropyLoss
    def __init__(self, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
                 return_z_loss=False, accum_dtype=None):
        pass

    def forward(self, lin_weight, _input, target, bias=None):
        pass


class _LigerLoss060:  # liger-kernel 0.6.0: no accum_dtype (bf16 gradient sums)
    def __init__(self, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None):
        pass

    def forward(self, lin_weight, _input, target, bias=None):
        pass


class _LigerLoss03:  # liger-kernel 0.3: no softcap
    def __init__(self, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0, reduction="mean"):
        pass

    def forward(self, lin_weight, _input, target, bias=None):
        pass


def test_liger_fused_loss_signature():
    compat.check_liger_fused_loss(_LigerLoss062)
    for old in (_LigerLoss060, _LigerLoss03):
        with pytest.raises(IncompatibleLibraryError, match=r"liger-kernel>=0.6.2"):
            compat.check_liger_fused_loss(old)
    if importlib.util.find_spec("liger_kernel"):  # installed on GPU machines (the gpu extra)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        compat.check_liger_fused_loss(LigerFusedLinearCrossEntropyLoss)


def test_flash_attention_reads_the_collators_boundaries_through_transformers(monkeypatch):
    compat.check_flash_attention_kwargs()
    # and choosing flash_attention_2 (a CUDA machine with a usable flash-attn) runs the check at start-up
    import sys
    import types

    import transformers.modeling_flash_attention_utils as flash_utils
    import transformers.utils

    from prolong.training.attention import choose_attn_implementation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda *a, **k: True)
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=None))
    assert choose_attn_implementation("flash_attention_2") == "flash_attention_2"

    def without_boundaries(query_states, key_states, value_states, attention_mask, query_length, is_causal=True):
        pass

    monkeypatch.setattr(flash_utils, "_flash_attention_forward", without_boundaries)
    for requested in ("flash_attention_2", "auto"):
        with pytest.raises(IncompatibleLibraryError, match="cu_seq_lens_q"):
            choose_attn_implementation(requested)


def test_accelerate_fsdp2_takes_our_configs_and_the_hand_off_call():
    """Every ``fsdp_config`` key of our accelerate configs is an ``accelerate launch`` option (how
    accelerate reads them) and the plugin knows ``fsdp_version`` (2 = torch's fully_shard); the
    stage hand-off calls ``load_fsdp_optimizer(plugin, accelerator, optimizer, model, input_dir)``."""
    import yaml
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin, load_fsdp_optimizer
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2 lives here from torch 2.6)

    options = launch_command_parser()._option_string_actions
    paths = sorted((ROOT / "accelerate_configs").glob("*fsdp2*.yaml"))
    assert paths
    for path in paths:
        unknown = [key for key in yaml.safe_load(path.read_text()).get("fsdp_config", {}) if f"--{key}" not in options]
        assert not unknown, f"{path.name}: accelerate launch takes no {unknown}"
    assert "fsdp_version" in inspect.signature(FullyShardedDataParallelPlugin).parameters
    hand_off = list(inspect.signature(load_fsdp_optimizer).parameters)[:5]
    assert hand_off == ["fsdp_plugin", "accelerator", "optimizer", "model", "input_dir"]


def test_save_on_cpu_takes_pin_memory():
    compat.check_save_on_cpu()


def test_trl_fused_loss_kernel_equals_the_chunked_loss():
    """The CUDA default when liger-kernel is missing; TRL's kernel also runs (torch ops) on CPU."""
    from trl.kernels import ChunkedLogProbFunction

    from prolong.training.loss import chunked_cross_entropy_sum, trl_linear_cross_entropy_sum

    names = list(inspect.signature(ChunkedLogProbFunction.forward).parameters)[1:10]
    assert names == ["hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
                     "logit_scale", "outputs"]  # the positional order trl_linear_cross_entropy_sum passes
    torch.manual_seed(0)
    hidden = torch.randn(1, 300, 16, requires_grad=True)
    weight, bias = torch.randn(50, 16, requires_grad=True), torch.randn(50)
    labels = torch.randint(0, 50, (1, 300))
    labels[0, :40] = -100
    for scale, softcap in [(None, None), (2.0, 5.0)]:
        ours = chunked_cross_entropy_sum(hidden, weight, labels, 64, softcap, lm_head_bias=bias, logit_scale=scale)
        trl = trl_linear_cross_entropy_sum(hidden, weight, labels, softcap, lm_head_bias=bias, logit_scale=scale)
        torch.testing.assert_close(trl, ours)
        for a, b in zip(torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(trl, (hidden, weight))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_loss_kernel_is_validated():
    from prolong.config import CPTConfig, RecipeError

    with pytest.raises(RecipeError, match="loss_kernel must be auto, liger, trl or chunked"):
        CPTConfig(output_dir="unused", loss_kernel="fused")


def test_activation_offload_checks_save_on_cpu_when_the_trainer_starts(monkeypatch, tmp_path):
    """The check runs at start-up where the feature is on, not as a TypeError in the first forward."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from prolong.config import CPTConfig
    from prolong.training.collator import PackedCollator
    from prolong.training.trainer import CPTTrainer

    def save_on_cpu_without_pin_memory():  # a torch whose save_on_cpu lost the argument
        pass

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", save_on_cpu_without_pin_memory)
    rows = [{"input_ids": list(range(3, 35)), "indices": [[0, 32]]}]

    def build(offload):
        args = CPTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                         check_document_masking=False, activation_offload=offload)
        return CPTTrainer(model=LlamaForCausalLM(tiny_llama_config(320)), args=args, train_dataset=rows,
                          data_collator=PackedCollator())

    build(offload=False)  # off: not checked
    with pytest.raises(IncompatibleLibraryError, match="save_on_cpu takes no pin_memory"):
        build(offload=True)
