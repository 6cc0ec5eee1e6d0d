"""Attention backends honest about what they support, on CPU: the ``varlen`` backend runs on a stand-in
for torch's CUDA-only ``varlen_attn`` (the installed signature, the kernel's arithmetic and dtype rules);
it casts like transformers' flash path, honours sliding windows, refuses soft-capping and KV caches;
``auto`` and explicit choices respect the model's features and flash-attn's real availability; the
recall callback generates through a backend with a cache."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import json
import sys
import types

import pytest
import torch
import torch.nn.attention.varlen as varlen_module
import torch.nn.functional as F
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from prolong.errors import RecipeError
from prolong.training.attention import choose_attn_implementation, varlen_attention_forward
from prolong.training.collator import NOT_MODEL_INPUTS, PackedCollator

INSTALLED_VARLEN = varlen_module.varlen_attn


def make_stand_in(calls: list, check_dtypes: bool = True):
    """What the CUDA kernel computes: sequence i is q[cu_q[i]:cu_q[i+1]] against k/v[cu_k[i]:cu_k[i+1]],
    the query block aligned to the end of the key block, keys within window_size=(left, right) of each
    query (-1: unbounded; (-1, 0) = causal), fp32 accumulation. ``check_dtypes``: the kernel's rules."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        calls.append({"dtypes": (query.dtype, key.dtype, value.dtype), "cu_dtype": cu_seq_q.dtype,
                      "window_size": tuple(window_size), "scale": scale, "enable_gqa": enable_gqa})
        if check_dtypes:
            if not (query.dtype == key.dtype == value.dtype and query.dtype in (torch.float16, torch.bfloat16)):
                raise RuntimeError(f"FlashAttention only supports fp16 and bf16 with equal dtypes, got "
                                   f"q={query.dtype} k={key.dtype} v={value.dtype}")
            if cu_seq_q.dtype != torch.int32 or cu_seq_k.dtype != torch.int32:
                raise RuntimeError("cu_seqlens must be int32")
            if not (isinstance(max_q, int) and isinstance(max_k, int)):
                raise RuntimeError("max_q and max_k must be Python ints")
        heads_q, heads_k = query.shape[1], key.shape[1]
        if heads_q != heads_k and not enable_gqa:  # torch's own check
            raise ValueError(f"Expect query and key/value to have the same number of heads but got Hq={heads_q} "
                             f"and Hkv={heads_k}. Try setting enable_gqa=True for GQA.")
        left, right = window_size
        out = torch.zeros(query.shape[0], heads_q, value.shape[-1], dtype=query.dtype)
        bounds = zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), cu_seq_k[:-1].tolist(), cu_seq_k[1:].tolist())
        for q_start, q_end, k_start, k_end in bounds:
            q = query[q_start:q_end].float().transpose(0, 1)
            k, v = (t[k_start:k_end].float().transpose(0, 1).repeat_interleave(heads_q // heads_k, dim=0)
                    for t in (key, value))
            scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
            q_pos = torch.arange(q_end - q_start)[:, None] + (k_end - k_start) - (q_end - q_start)
            k_pos = torch.arange(k_end - k_start)[None]
            allowed = torch.ones_like(scores[0], dtype=torch.bool)
            if left >= 0:
                allowed &= k_pos >= q_pos - left
            if right >= 0:
                allowed &= k_pos <= q_pos + right
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num()
            out[q_start:q_end] = (probs @ v).transpose(0, 1).to(query.dtype)
        return out

    return varlen_attn


@pytest.fixture
def kernel_calls(monkeypatch):
    """The stand-in kernel with its dtype rules, in place of torch's; yields the list of its calls."""
    calls = []
    monkeypatch.setattr(varlen_module, "varlen_attn", make_stand_in(calls))
    return calls


@pytest.fixture
def fp32_kernel(monkeypatch):
    """The stand-in without dtype rules: the kernel's arithmetic in fp32, for exact comparisons."""
    calls = []
    monkeypatch.setattr(varlen_module, "varlen_attn", make_stand_in(calls, check_dtypes=False))
    return calls


def _packed(lengths, vocab=100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (sum(lengths),), generator=gen).tolist()
    spans, start = [], 0
    for n in lengths:
        spans.append([start, start + n])
        start += n
    batch = PackedCollator()([{"input_ids": ids, "indices": spans}])
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def _logits(cls, config, attn, inputs, seed=0):
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits.float()


def test_the_stand_in_has_the_installed_signature_and_the_kernels_rules():
    stand_in = make_stand_in([])
    installed = inspect.signature(INSTALLED_VARLEN).parameters
    ours = inspect.signature(stand_in).parameters
    def described(parameters):
        return [(p.name, p.kind, p.default) for p in parameters.values()]

    assert described(ours) == described(installed)
    q = torch.randn(12, 4, 8, dtype=torch.bfloat16)
    k, v = torch.randn(12, 2, 8, dtype=torch.bfloat16), torch.randn(12, 2, 8, dtype=torch.bfloat16)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="equal dtypes"):
        stand_in(q, k.float(), v, cu, cu, 7, 7, window_size=(-1, 0), enable_gqa=True)
    with pytest.raises(RuntimeError, match="int32"):
        stand_in(q, k, v, cu.long(), cu.long(), 7, 7, window_size=(-1, 0), enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        stand_in(q, k, v, cu, cu, 7, 7, window_size=(-1, 0))
    out = stand_in(q, k, v, cu, cu, 7, 7, window_size=(2, 0), enable_gqa=True, scale=0.3)
    for start, end in ((0, 5), (5, 12)):
        n = end - start
        band = torch.ones(n, n, dtype=torch.bool).tril() & ~torch.ones(n, n, dtype=torch.bool).tril(-3)
        doc = [t[start:end].float().transpose(0, 1) for t in (q, k, v)]
        expected = F.scaled_dot_product_attention(*doc, attn_mask=band, scale=0.3, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(out[start:end].float(), expected, atol=1e-2, rtol=1e-2)


def test_fp32_weights_under_bf16_autocast_reach_the_kernel_in_bf16_and_match_sdpa(kernel_calls):
    """The Trainer's bf16 path (fp32 master weights, autocast): RoPE leaves q, k in fp32 and v in bf16;
    the backend casts all three to bf16 as transformers' flash path does (the kernel refuses mixed dtypes)."""
    config = tiny_llama_config(320, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    inputs = _packed([40, 60, 28], vocab=300)
    reference = _logits(LlamaForCausalLM, config, "sdpa", inputs)
    config._attn_implementation = "varlen"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**inputs, use_cache=False).logits.float()
        logits.logsumexp(-1).mean().backward()  # training: the backward goes through the cast
    assert kernel_calls and all(c["dtypes"] == (torch.bfloat16,) * 3 for c in kernel_calls)
    assert all(c["cu_dtype"] == torch.int32 and c["window_size"] == (-1, 0) for c in kernel_calls)
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    scale = reference.abs().max().item()
    assert (logits - reference).abs().max().item() < 0.03 * scale  # bf16 against fp32


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM, MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=8)


def _qwen2_mixed():  # layer 0 full attention, layer 1 a sliding window: the window is per layer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM, Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                         sliding_window=8, layer_types=["full_attention", "sliding_attention"])


@pytest.mark.parametrize("make", [_mistral, _qwen2_mixed], ids=["mistral", "qwen2-mixed-layers"])
def test_varlen_honours_the_sliding_window_of_each_layer(make, fp32_kernel):
    cls, config = make()
    inputs = _packed([20, 30, 14])
    eager = _logits(cls, config, "eager", inputs)
    varlen = _logits(cls, config, "varlen", inputs)
    assert (varlen - eager).abs().max().item() < 1e-3
    windows = {c["window_size"] for c in fp32_kernel}
    assert (7, 0) in windows  # transformers' window 8 counts the query: 7 keys to its left
    assert ((-1, 0) in windows) == (cls.__name__ == "Qwen2ForCausalLM")


def _gemma2_config():
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                        attn_logit_softcapping=50.0)


def _fake_cuda(monkeypatch, flash_usable: bool):
    """A CUDA machine as choose_attn_implementation sees it; find_spec('flash_attn') always finds a
    package (as with a broken or other-major install), transformers' own check decides."""
    import transformers.utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda *a, **k: flash_usable)
    real_find_spec = importlib.util.find_spec
    fake_spec = importlib.machinery.ModuleSpec("flash_attn", None)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: fake_spec if name == "flash_attn" else real_find_spec(name, *a, **k))
    if flash_usable:
        monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=None))


def test_softcapping_never_trains_on_a_backend_that_ignores_it(tmp_path, monkeypatch, fp32_kernel):
    from transformers import Gemma2ForCausalLM

    from prolong.config import ModelConfig
    from prolong.model import load_model

    config = _gemma2_config()
    for explicit in ("varlen", "sdpa"):
        with pytest.raises(RecipeError, match=r"attn_implementation: .*attn_logit_softcapping=50.*auto \(picks eager"):
            choose_attn_implementation(explicit, config)
    assert choose_attn_implementation("auto", config) == "eager"  # CPU: flex_attention has no backward here
    # the refusal comes before the weights load
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma2")
    with pytest.raises(RecipeError, match="attn_implementation: varlen"):
        load_model(ModelConfig(model_name_or_path=str(tmp_path / "gemma2"), attn_implementation="varlen"))
    # and the backend itself refuses a model that reaches it anyway
    with pytest.raises(RecipeError, match="soft-capping"):
        _logits(Gemma2ForCausalLM, config, "varlen", _packed([20, 30]))
    _fake_cuda(monkeypatch, flash_usable=False)
    assert choose_attn_implementation("auto", config) == "flex_attention"


def test_auto_on_a_gpu_picks_a_backend_that_honours_the_model(monkeypatch):
    _, mistral = _mistral()
    _fake_cuda(monkeypatch, flash_usable=False)
    assert choose_attn_implementation("auto", mistral) == "varlen"  # this torch's varlen_attn takes window_size

    def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        pass

    monkeypatch.setattr(varlen_module, "varlen_attn", varlen_attn_2_10)  # no window_size
    assert choose_attn_implementation("auto", mistral) == "flex_attention"
    with pytest.raises(RecipeError, match=r"attn_implementation: varlen .*sliding_window=8"):
        choose_attn_implementation("varlen", mistral)
    assert choose_attn_implementation("auto", tiny_llama_config(320)) == "varlen"
    _fake_cuda(monkeypatch, flash_usable=True)
    assert choose_attn_implementation("auto", _gemma2_config()) == "flash_attention_2"


def test_flash_attention_2_is_chosen_by_transformers_check_not_by_find_spec(monkeypatch):
    _fake_cuda(monkeypatch, flash_usable=False)  # a flash_attn package is found, transformers says unusable
    assert choose_attn_implementation("auto") == "varlen"
    with pytest.raises(RecipeError, match=r"attn_implementation: flash_attention_2 .*flash-attn wheel built for this "
                                          r"torch and CUDA.*auto \(picks varlen"):
        choose_attn_implementation("flash_attention_2")
    import transformers.utils

    # transformers' metadata check passes, the wheel does not load (built for another torch or CUDA)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda *a, **k: True)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises ImportError
    with pytest.raises(RecipeError, match="does not load"):
        choose_attn_implementation("flash_attention_2")
    assert choose_attn_implementation("auto") == "varlen"


def test_generation_never_runs_through_varlen(fp32_kernel):
    config = tiny_llama_config(320)
    config._attn_implementation = "varlen"
    model = LlamaForCausalLM(config).eval()
    ids = torch.tensor([[5, 17, 33, 8, 91, 12]])
    with pytest.raises(RecipeError, match="KV cache"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    # a decode step (one query against the cached keys), whatever use_cache says
    q, kv = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 6, 16)
    with pytest.raises(RecipeError, match="KV cache"):
        varlen_attention_forward(model.model.layers[0].self_attn, q, kv, kv, None, position_ids=torch.tensor([[5]]))
    assert not fp32_kernel  # the kernel was never reached


def test_the_recall_callback_on_a_varlen_model_scores_what_a_fresh_sdpa_model_scores(tmp_path, kernel_calls):
    """Training runs through varlen (bf16 autocast, the kernel's dtype rules); the callback generates
    with sdpa and gives the training backend back; a fresh sdpa load of the same weights agrees exactly."""
    from helpers import make_model, make_tokenizer
    from transformers import Trainer, TrainingArguments

    from evaluation import evaluate
    from evaluation.callback import RecallEvalCallback

    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    model.set_attn_implementation("varlen")
    text = tokenizer("The grass is green. The sky is blue. " * 6)["input_ids"]
    rows = [{"input_ids": text, "indices": [[0, 20], [20, len(text)]]}] * 2
    collator = PackedCollator()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, bf16=True, max_steps=2, save_steps=2,
                             per_device_train_batch_size=1, learning_rate=1e-2, report_to=[], disable_tqdm=True,
                             save_only_model=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                      data_collator=lambda batch: {k: v for k, v in collator(batch).items()
                                                   if k not in ("shift_labels", "document_lengths")})
    settings = dict(tasks=["json_kv"], num_samples=2, generation_max_length=8, progress=False)
    RecallEvalCallback(lengths=[256], **settings).attach(trainer)
    trainer.train()
    assert kernel_calls and all(c["dtypes"] == (torch.bfloat16,) * 3 for c in kernel_calls)  # it trained on varlen
    assert model.config._attn_implementation == "varlen" and model.training  # given back after the evaluation

    checkpoint = tmp_path / "run" / "checkpoint-2"
    during = json.loads((checkpoint / "recall_eval" / "scores.json").read_text())
    fresh = evaluate(str(checkpoint), tokenizer=tokenizer, lengths=[256], output_dir=str(tmp_path / "fresh"),
                     attn_implementation="sdpa", max_samples=2, tasks=["json_kv"], generation_max_length=8,
                     progress=False, plots=False, num_depths=5)

    def outputs(root):
        lines = (root / "predictions" / "json_kv_256.jsonl").read_text().splitlines()
        return [json.loads(line)["output"] for line in lines]

    assert [r["score"] for r in during["results"]] == [r["score"] for r in fresh["results"]] != [None]
    assert outputs(checkpoint / "recall_eval") == outputs(tmp_path / "fresh")
