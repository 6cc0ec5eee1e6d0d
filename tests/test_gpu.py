"""GPU-only paths (skipped without CUDA): varlen / flash attention on packed rows and Liger's loss.

Run on a GPU machine with `pytest tests/test_gpu.py -v` (flash-attn and liger-kernel optional:
their tests skip when the package is missing). CPU equivalents live in test_packing_equivalence.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from prolong.training.attention import check_document_masking, choose_attn_implementation, flash_attention_2_problem
from prolong.training.collator import NOT_MODEL_INPUTS, PackedCollator
from prolong.training.loss import chunked_cross_entropy_sum


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BACKENDS = ["varlen", "sdpa", "flex_attention"] + (
    ["flash_attention_2"] if flash_attention_2_problem() is None else []  # transformers' check, then an import
)


def _model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_llama_config(320, hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()


@pytest.mark.parametrize("attn", BACKENDS)
def test_packed_row_equals_documents_alone_on_gpu(attn):
    model = _model(attn)
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 300, (n,), generator=gen) for n in (70, 1, 300, 129)]
    spans, start = [], 0
    for doc in docs:
        spans.append([start, start + len(doc)])
        start += len(doc)
    batch = PackedCollator()([{"input_ids": torch.cat(docs).tolist(), "indices": spans}])
    with torch.no_grad():
        # what training passes: positions and the collator's varlen boundaries (cu_seq_lens, max_length)
        model_inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
        packed = model(**model_inputs, use_cache=False).logits[0].float()
        start = 0
        for doc in docs:
            alone = model(input_ids=doc[None].cuda(), use_cache=False).logits[0].float()
            torch.testing.assert_close(packed[start : start + len(doc)], alone, atol=3e-2, rtol=3e-2)
            start += len(doc)
    assert check_document_masking(model) == 0.0


def test_auto_picks_a_varlen_kernel_on_gpu():
    assert choose_attn_implementation("auto") in ("flash_attention_2", "varlen")


@pytest.mark.skipif(not importlib.util.find_spec("liger_kernel"), reason="liger-kernel not installed")
def test_liger_fused_loss_equals_the_chunked_loss():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    torch.manual_seed(0)
    hidden = torch.randn(3000, 64, device="cuda", requires_grad=True)
    weight = torch.randn(500, 64, device="cuda", requires_grad=True)
    labels = torch.randint(0, 500, (3000,), device="cuda")
    labels[:1500] = -100
    ours = chunked_cross_entropy_sum(hidden, weight, labels, chunk_size=1024)
    liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, labels)
    reference = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(liger, reference, rtol=1e-4, atol=1e-2)


@pytest.mark.skipif(not importlib.util.find_spec("liger_kernel"), reason="liger-kernel not installed")
def test_liger_loss_as_trained_sums_a_long_rows_lm_head_gradient_in_fp32():
    """bf16 hidden states and lm_head of a 64K-token row, the loss the trainer builds: its lm_head
    gradient matches an fp32 reference as closely as one bf16 rounding allows."""
    from prolong.training.loss import liger_linear_cross_entropy_sum

    torch.manual_seed(0)
    hidden = (torch.randn(65536, 256, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(2000, 256, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 2000, (65536,), device="cuda")
    liger_linear_cross_entropy_sum()(weight, hidden, labels).backward()
    hidden32, weight32 = (t.detach().float().requires_grad_(True) for t in (hidden, weight))
    F.cross_entropy(hidden32 @ weight32.T, labels, reduction="sum").backward()
    error = (weight.grad.float() - weight32.grad).norm() / weight32.grad.norm()
    assert error < 1e-2, error  # the result rounded once to bf16 is off by ~4e-3; not measured on a GPU yet


def test_tiled_mlp_under_bf16_autocast_on_gpu():
    """The Trainer's bf16 path: fp32 weights, CUDA autocast; the backward's recomputation runs
    on the autograd engine's CUDA thread, where autocast must be re-entered."""
    import copy

    from prolong.training.memory import enable_tiled_mlp

    torch.manual_seed(0)
    plain = LlamaForCausalLM(tiny_llama_config(320, hidden_size=256, intermediate_size=1024)).cuda()
    tiled = copy.deepcopy(plain)
    enable_tiled_mlp(tiled, tile_tokens=64)
    ids = torch.randint(3, 300, (1, 500), device="cuda")
    grads = []
    for model in (plain, tiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads.append({name: p.grad.float() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=2e-2, atol=2e-3, msg=name)


def test_run_cpt_fast_path_on_gpu_follows_the_cpu_reference_curve(tiny_model_dir, packed_mixture, tmp_path):
    """The whole GPU training path in one run: the auto backend (flash or varlen) fed the
    collator's cu_seq_lens, bf16, Liger (if installed), tiled MLP, checkpointing, CPU offload,
    the masking probe on CUDA; its loss curve must follow an fp32 sdpa run of the same recipe."""
    from helpers import cpt_argv as _argv, logged_losses as _losses

    from prolong.run_cpt import main

    reference = _losses(main(_argv(tiny_model_dir, packed_mixture, tmp_path / "ref", max_steps=3, dtype="float32",
                                   attn_implementation="sdpa", bf16="false", use_liger_kernel="false",
                                   loss_kernel="chunked")))  # a true fp32 reference: weights, compute, loss
    fast = _losses(main(_argv(
        tiny_model_dir, packed_mixture, tmp_path / "fast", max_steps=3, attn_implementation="auto", bf16="true",
        use_liger_kernel=str(importlib.util.find_spec("liger_kernel") is not None).lower(),
        tiled_mlp_tokens=32, activation_checkpointing="true", activation_offload="true",
    )))
    assert sorted(fast) == sorted(reference) == [1, 2, 3]
    for step, loss in reference.items():
        assert fast[step] == pytest.approx(loss, rel=2e-2), step  # bf16 vs fp32


@pytest.mark.parametrize("kernel", ["chunked", "trl"])
def test_the_loss_forward_never_syncs_with_the_host(kernel):
    """16 syncs per 64K micro-step before (`.any()` per 4,096-token chunk); the GPU queue must stay full."""
    from prolong.training.loss import trl_linear_cross_entropy_sum

    torch.manual_seed(0)
    hidden = torch.randn(1, 9000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(500, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 500, (1, 9000), device="cuda")
    labels[0, :4096] = -100  # a whole chunk without targets: the old code skipped it after a sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if kernel == "chunked":
            loss = chunked_cross_entropy_sum(hidden, weight, labels, chunk_size=4096)
        else:
            loss = trl_linear_cross_entropy_sum(hidden, weight, labels)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    reference = F.cross_entropy((hidden.float() @ weight.float().T)[0], labels[0], ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss.float(), reference, rtol=2e-2, atol=1.0)


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_the_installed_varlen_kernel_runs_with_the_shimmed_arguments(sliding_window):
    """The real CUDA kernel with the arguments prolong.training.compat builds for this torch; a sliding
    window as transformers counts it (the query and the window - 1 keys before it)."""
    from torch.nn.attention.varlen import varlen_attn

    from prolong.training.compat import varlen_causal_call, varlen_takes_window

    if sliding_window and not varlen_takes_window(varlen_attn):
        pytest.skip("this torch's varlen_attn has no window_size")
    q = torch.randn(20, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(20, 2, 64, device="cuda", dtype=torch.bfloat16)
    kwargs, repeat_kv = varlen_causal_call(varlen_attn, 64**-0.5, 64, 4, 2, sliding_window=sliding_window)
    if repeat_kv:
        k = k.repeat_interleave(2, dim=1)
    cu = torch.tensor([0, 7, 20], device="cuda", dtype=torch.int32)
    out = varlen_attn(q, k, k, cu, cu, 13, 13, **kwargs)
    kv = k if repeat_kv else k.repeat_interleave(2, dim=1)  # the reference has one K/V head per query head
    for start, end in ((0, 7), (7, 20)):
        q_doc, kv_doc = (t[start:end].transpose(0, 1)[None] for t in (q, kv))
        q_pos, k_pos = torch.arange(end - start, device="cuda")[:, None], torch.arange(end - start, device="cuda")[None]
        mask = (k_pos <= q_pos) & (k_pos > q_pos - (sliding_window or end))  # transformers' sliding_window_overlay
        expected = F.scaled_dot_product_attention(q_doc, kv_doc, kv_doc, attn_mask=mask)[0].transpose(0, 1)
        torch.testing.assert_close(out[start:end].float(), expected.float(), atol=2e-2, rtol=2e-2)
