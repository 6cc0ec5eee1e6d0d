"""Packed rows must behave exactly like the documents run one by one, for every backend here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama_config
from transformers import AttentionInterface, LlamaForCausalLM
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from prolong.training.attention import DocumentMaskingError, check_document_masking
from prolong.training.collator import NOT_MODEL_INPUTS, PackedCollator
from prolong.training.loss import chunked_cross_entropy_sum


DOC_LENGTHS = [7, 33, 1, 20]


def _backends():
    # the CUDA-only ones: tests/test_gpu.py; flex_attention compiles on CPU (slow)
    return ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow)]


def _model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_llama_config(320)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def _documents():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 300, (n,), generator=gen) for n in DOC_LENGTHS]


def _packed_batch(docs):
    spans, start = [], 0
    for doc in docs:
        spans.append([start, start + len(doc)])
        start += len(doc)
    return PackedCollator()([{"input_ids": torch.cat(docs).tolist(), "indices": spans}])


@pytest.mark.parametrize("attn", _backends())
def test_packed_forward_and_loss_equal_separate_documents(attn):
    model = _model(attn)
    docs = _documents()
    batch = _packed_batch(docs)
    hidden = {}
    model.model.register_forward_hook(lambda m, a, out: hidden.__setitem__("h", out.last_hidden_state))
    with torch.no_grad():
        # everything the collator gives the model in training (positions, varlen boundaries)
        model_inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
        packed = model(**model_inputs, use_cache=False).logits[0]
        packed_loss_sum = chunked_cross_entropy_sum(hidden["h"], model.lm_head.weight, batch["shift_labels"], 16)
        start, separate_sum, separate_count = 0, 0.0, 0
        for doc in docs:
            alone = model(input_ids=doc[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(doc)], alone, atol=2e-5, rtol=1e-4)
            if len(doc) > 1:
                separate_sum += F.cross_entropy(alone[:-1], doc[1:], reduction="sum").item()
                separate_count += len(doc) - 1
            start += len(doc)
    assert (batch["shift_labels"] != -100).sum().item() == separate_count
    assert packed_loss_sum.item() == pytest.approx(separate_sum, rel=1e-5)


def test_collator_positions_and_labels():
    batch = PackedCollator()(
        [{"input_ids": [5, 6, 7, 8, 9], "indices": [[0, 2], [2, 5]]}, {"input_ids": [1, 2], "indices": [[0, 2]], "mask": [0, 1]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    # first token of every document has no target; mask 0 drops a target too
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, 9, -100, 2]]
    assert batch["shift_labels"].tolist() == [[6, -100, 8, 9, -100, 2, -100]]
    assert "attention_mask" not in batch
    # the varlen kernels' boundaries, as transformers derives them from position_ids (per layer)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == cu_q.tolist() == [0, 2, 5, 7]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == int(max_q) == 3
    assert isinstance(batch["max_length_q"], int)  # a Python int: no host sync in the kernels
    with pytest.raises(ValueError, match="indices"):
        PackedCollator()([{"input_ids": [1, 2, 3], "indices": [[0, 2]]}])
    with pytest.raises(ValueError, match="indices"):  # right lengths, but not the tokens' spans
        PackedCollator()([{"input_ids": [1, 2, 3, 4], "indices": [[1, 3], [3, 5]]}])


def test_chunked_cross_entropy_matches_full_and_never_nans():
    torch.manual_seed(0)
    hidden = torch.randn(50, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    labels = torch.randint(0, 30, (50,))
    labels[:20] = -100  # the first chunk of 16 has no valid label at all
    loss = chunked_cross_entropy_sum(hidden, weight, labels, chunk_size=16)
    reference = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss, reference)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(reference, (hidden, weight))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    nothing = chunked_cross_entropy_sum(hidden, weight, torch.full((50,), -100), chunk_size=16)
    assert nothing.item() == 0.0 and not torch.isnan(nothing)


def _leaky_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention over the whole row: documents see each other (the bug the guard exists for)."""
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def test_masking_guard_refuses_a_backend_that_mixes_documents():
    AttentionInterface.register("leaky_test", _leaky_attention)
    assert check_document_masking(_model("sdpa")) == 0.0
    with pytest.raises(DocumentMaskingError, match="leaky_test"):
        check_document_masking(_model("leaky_test"))


def test_dense_mask_backends_are_warned_about_at_long_lengths():
    from prolong.training.attention import dense_mask_warning

    message = dense_mask_warning("sdpa", 65536)
    assert "65536 x 65536" in message and "4 GiB" in message and "auto" in message
    assert dense_mask_warning("eager", 131072) is not None
    assert dense_mask_warning("sdpa", 4096) is None  # short rows: the mask is cheap
    assert dense_mask_warning("varlen", 524288) is None and dense_mask_warning("flash_attention_2", 524288) is None


def _small_head_models():
    from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM, PhiConfig, PhiForCausalLM

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320)
    torch.manual_seed(0)
    phi = PhiForCausalLM(PhiConfig(**small))
    torch.nn.init.normal_(phi.lm_head.bias, std=2.0)  # a bias that matters
    return {
        "phi-lm_head-bias": phi,
        "granite-logits_scaling": GraniteForCausalLM(GraniteConfig(**small, logits_scaling=8.0)),
        "cohere-logit_scale": CohereForCausalLM(CohereConfig(**small, logit_scale=0.0625)),
    }


@pytest.mark.parametrize("name", ["phi-lm_head-bias", "granite-logits_scaling", "cohere-logit_scale"])
def test_chunked_loss_applies_the_models_output_head(name):
    from prolong.training.loss import logit_scale_of

    model = _small_head_models()[name].eval()
    batch = _packed_batch(_documents())
    hidden = {}
    model.get_decoder().register_forward_hook(lambda m, a, out: hidden.__setitem__("h", out.last_hidden_state))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        expected = F.cross_entropy(logits.float(), batch["shift_labels"][0], ignore_index=-100, reduction="sum")
        ours = chunked_cross_entropy_sum(hidden["h"], model.lm_head.weight, batch["shift_labels"], 16,
                                         lm_head_bias=model.lm_head.bias, logit_scale=logit_scale_of(model.config))
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    assert check_document_masking(model) == 0.0  # the start-up probe accepts the head too


def test_an_unknown_output_head_is_refused():
    from prolong.training.attention import OutputHeadError

    class DoubledLogits(LlamaForCausalLM):  # a head transform the chunked loss does not know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    torch.manual_seed(0)
    with pytest.raises(OutputHeadError, match="computes its logits differently"):
        check_document_masking(DoubledLogits(tiny_llama_config(320)))
