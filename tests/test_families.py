"""The model families users bring (tests/families.py: Qwen2.5, Qwen3, Llama-3.x, Mistral, Gemma 2/3,
OLMo 2/3, Phi-3, Phi-4-mini as tiny random models) trained packed and exact on every CPU backend we
select: the packed row equals the documents run one by one through the model's reference attention
(eager), the masking probe passes and catches a collator that mixes documents, `auto` honours
windows and soft-caps, Ulysses SP on gloo equals one process, LoRA SFT masks only the assistant's
tokens of the family's chat template, the final-logit soft-cap reaches every loss, RoPE settings
apply per family and survive save/load, and the family recipes run end to end on CPU.
docs/families.md is the table of these results."""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.attention.varlen as varlen_module
import torch.nn.functional as F
from conftest import WORDS, bpe_tokenizer, random_documents, write_packed_dataset
from families import FAMILIES, VOCAB, family_config, family_model
from helpers import launch
from test_attention_backends import _fake_cuda, make_stand_in

from prolong.config import ModelConfig
from prolong.errors import RecipeError
from prolong.model import apply_rope_settings, load_model
from prolong.training.attention import (DocumentMaskingError, attention_features, check_document_masking,
                                        choose_attn_implementation)
from prolong.training.collator import NOT_MODEL_INPUTS, VARLEN_KWARGS, PackedCollator
from prolong.training.loss import (chunked_cross_entropy_sum, liger_linear_cross_entropy_sum, logit_scale_of,
                                   logit_softcap_of, trl_linear_cross_entropy_sum)

REPO = Path(__file__).resolve().parents[1]
SOFTCAPPED = {"gemma2"}  # attention and final-logit soft-capping
WINDOWED = {"mistral", "gemma2", "gemma3", "olmo3", "phi3"}
BACKENDS = ("sdpa", "eager", "flex_attention", "varlen")
DOC_LENGTHS = [7, 33, 1, 20]  # 33 and 20 are longer than the 8-token windows


def test_the_tiny_configs_keep_what_sets_each_family_apart():
    for family in FAMILIES:
        features = attention_features(family_config(family))
        assert ("sliding_window" in features) == (family in WINDOWED), family
        assert ("attn_logit_softcapping" in features) == (family in SOFTCAPPED), family
    assert logit_softcap_of(family_config("gemma2")) == 30.0
    assert family_config("phi4-mini").rope_parameters["partial_rotary_factor"] == 0.75
    assert set(family_config("gemma3").rope_parameters) == {"sliding_attention", "full_attention"}
    assert family_model("qwen3").model.layers[0].self_attn.q_norm is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_never_picks_a_backend_that_ignores_the_family_attention(family, monkeypatch):
    config = family_config(family)
    softcapped = family in SOFTCAPPED
    assert choose_attn_implementation("auto", config) == ("eager" if softcapped else "sdpa")  # CPU
    for explicit in ("sdpa", "varlen"):
        if softcapped:
            with pytest.raises(RecipeError, match=f"attn_implementation: {explicit} .*attn_logit_softcapping=50"):
                choose_attn_implementation(explicit, config)
        else:
            assert choose_attn_implementation(explicit, config) == explicit
    _fake_cuda(monkeypatch, flash_usable=False)  # a GPU without flash-attn: torch's varlen takes windows here
    assert choose_attn_implementation("auto", config) == ("flex_attention" if softcapped else "varlen")


def allowed(family: str, backend: str) -> bool:
    try:
        choose_attn_implementation(backend, family_config(family))
    except RecipeError:
        return False
    return True


@pytest.fixture
def cpu_backend(request, monkeypatch):
    """flex_attention without torch.compile (its CPU compile takes minutes per mask: the same mask_mod
    and score_mod, evaluated by torch's reference path); varlen through tests/test_attention_backends.py's
    stand-in for the CUDA kernel."""
    backend = request.param
    if backend == "flex_attention":
        import torch.nn.attention.flex_attention as flex
        import transformers.integrations.flex_attention as hf_flex
        import transformers.masking_utils as masking

        monkeypatch.setattr(flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
        monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention",
                            lambda q, k, v, training=False, **kwargs: flex.flex_attention(q, k, v, **kwargs))
        monkeypatch.setattr(masking, "create_block_mask",
                            lambda *args, _compile=False, **kwargs: flex.create_block_mask(*args, **kwargs))
    if backend == "varlen":
        monkeypatch.setattr(varlen_module, "varlen_attn", make_stand_in([], check_dtypes=False))
    return backend


def _documents():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=generator) for n in DOC_LENGTHS]


def _packed(docs) -> dict:
    spans, start = [], 0
    for doc in docs:
        spans.append([start, start + len(doc)])
        start += len(doc)
    return PackedCollator()([{"input_ids": torch.cat(docs).tolist(), "indices": spans}])


def _trainer_loss_sum(model, batch) -> torch.Tensor:
    """CPTTrainer.compute_loss's sum: decoder hidden states through the model's head (bias, scale, soft-cap)."""
    hidden = {}
    handle = model.get_decoder().register_forward_hook(lambda m, a, out: hidden.update(h=out.last_hidden_state))
    model(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}, use_cache=False, logits_to_keep=1)
    handle.remove()
    head = model.get_output_embeddings()
    return chunked_cross_entropy_sum(hidden["h"], head.weight, batch["shift_labels"], 16, logit_softcap_of(model.config),
                                     lm_head_bias=head.bias, logit_scale=logit_scale_of(model.config))


# make test-fast keeps eager / sdpa / varlen for every family; the flex_attention cases run in the full suite
CASES = [pytest.param(family, backend, id=f"{family}-{backend}",
                      marks=pytest.mark.slow if backend == "flex_attention" else ())
         for family in FAMILIES for backend in BACKENDS]


@pytest.mark.parametrize("family,cpu_backend", CASES, indirect=["cpu_backend"])
def test_packed_row_equals_the_documents_run_alone(family, cpu_backend):
    """Logits and the trainer's loss of a packed row on each backend we select equal the documents run
    one by one through eager attention (transformers' reference: windows, soft-caps, sinks); a backend
    that would ignore the family's attention is refused instead."""
    if not allowed(family, cpu_backend):
        assert family in SOFTCAPPED and cpu_backend in ("sdpa", "varlen")
        return
    docs = _documents()
    reference = family_model(family, "eager")
    model = family_model(family, cpu_backend)
    batch = _packed(docs)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}, use_cache=False).logits[0]
        packed_sum = _trainer_loss_sum(model, batch)
        start, separate_sum = 0, 0.0
        for doc in docs:
            alone = reference(input_ids=doc[None], position_ids=torch.arange(len(doc))[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + len(doc)], alone, atol=2e-5, rtol=1e-4)
            separate_sum += F.cross_entropy(alone[:-1], doc[1:], reduction="sum").item()
            start += len(doc)
    assert packed_sum.item() == pytest.approx(separate_sum, rel=1e-5)


class MixingCollator(PackedCollator):
    """A collator that loses the boundaries: positions run on through the row, one long document."""

    def __call__(self, examples):
        batch = super().__call__(examples)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[-1])[None]
        for key in VARLEN_KWARGS:
            batch.pop(key, None)
        return batch


@pytest.mark.parametrize("family,cpu_backend", CASES, indirect=["cpu_backend"])
def test_masking_probe_passes_and_catches_a_collator_that_mixes_documents(family, cpu_backend):
    if not allowed(family, cpu_backend):
        return  # refused before the probe (test above)
    model = family_model(family, cpu_backend)
    assert check_document_masking(model) <= 1e-6
    with pytest.raises(DocumentMaskingError, match="attend to each other"):
        check_document_masking(model, collator=MixingCollator())


# -- sequence parallelism: ONE torchrun launch for every family -----------------------------------

@pytest.fixture(scope="module")
def sp_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("family-sp")
    launch(REPO / "tests" / "distributed" / "family_worker.py", out, processes=2, timeout=300)
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_parallel_on_gloo_equals_one_process(sp_results, family):
    """Ulysses over 2 ranks (the backend auto picks, windows built per layer for the whole row)."""
    result = sp_results[f"sp_{family}"]
    assert "error" not in result, result["error"]
    assert result["inner"] == f"ulysses_{'eager' if family in SOFTCAPPED else 'sdpa'}"
    assert result["loss_diff"] < 1e-5
    assert result["grad_diff"] < 1e-5 * result["grad_scale"], result
    assert result["position_gathers"] == 1


@pytest.mark.slow
def test_sequence_parallel_checks_would_see_a_lost_window_and_refuse_an_inner_backend_that_ignores_a_softcap(sp_results):
    control = sp_results["control_window_ignored"]
    assert control["grad_diff"] > 100 * 1e-5 * control["grad_scale"], control
    assert "attn_logit_softcapping=50" in sp_results["sdpa_inner_on_gemma2"]["refused"]


# -- the final-logit soft-cap in every loss -------------------------------------------------------

def test_final_logit_softcap_reaches_the_chunked_trl_liger_and_sft_losses(monkeypatch):
    """Gemma 2 caps its logits at 30: the CPT losses (chunked, TRL's fused kernel, Liger's through the
    value we pass it) and the SFT stage's (TRL's fused head) equal the model's own capped logits."""
    from trl.trainer.utils import add_fused_lm_head

    model = family_model("gemma2", "eager")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(100)  # logits up to ~150 before the cap: it binds
    batch = _packed(_documents())
    labels = batch["shift_labels"][0]
    with torch.no_grad():
        hidden = {}
        model.get_decoder().register_forward_hook(lambda m, a, out: hidden.update(h=out.last_hidden_state))
        logits = model(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}, use_cache=False).logits[0]
        expected = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        weight, softcap = model.get_output_embeddings().weight, logit_softcap_of(model.config)
        assert 20 < logits.abs().max() <= softcap
        assert chunked_cross_entropy_sum(hidden["h"], weight, labels, 16, softcap).item() == pytest.approx(expected, rel=1e-5)
        assert trl_linear_cross_entropy_sum(hidden["h"], weight, labels, softcap).item() == pytest.approx(expected, rel=1e-5)
        # the cap matters here: without it the sum differs
        assert chunked_cross_entropy_sum(hidden["h"], weight, labels, 16).item() != pytest.approx(expected, rel=1e-3)

        class LigerStandIn:  # Liger's LigerFusedLinearCrossEntropyLoss signature and arithmetic (CUDA only)
            def __init__(self, reduction="mean", softcap=None, accum_dtype=None):
                self.softcap = softcap

            def forward(self, lin_weight, _input, target, bias=None):
                capped = self.softcap * torch.tanh(F.linear(_input, lin_weight, bias) / self.softcap)
                return F.cross_entropy(capped, target, ignore_index=-100, reduction="sum")

            __call__ = forward

        monkeypatch.setitem(sys.modules, "liger_kernel.transformers",
                            types.SimpleNamespace(LigerFusedLinearCrossEntropyLoss=LigerStandIn))
        liger = liger_linear_cross_entropy_sum(softcap)
        assert liger(weight, hidden["h"][0], labels, None).item() == pytest.approx(expected, rel=1e-5)

        add_fused_lm_head(model)  # what TRL's SFTTrainer adds and trains through
        fused = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                      use_cache=False, fused_lm_head=True)
        assert -fused.log_probs.sum().item() == pytest.approx(expected, rel=1e-4)


# -- RoPE per family ------------------------------------------------------------------------------

YARN_X4 = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 256,  # Phi-3's own scaling
            "short_factor": [1.0] * 6, "long_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0]}  # 6 = 16 * 0.75 / 2
ROPE_SETTINGS = {  # family -> (rope_theta, rope_scaling, the rope dicts that must change)
    "qwen2.5": (None, YARN_X4, {None}),  # Qwen's YaRN
    "qwen3": (None, YARN_X4, {None}),
    "llama-3.x": (8e6, None, {None}),  # the llama3 scaling stays, with the new base
    "mistral": (8e6, None, {None}),
    "gemma2": (8e6, None, {None}),
    "gemma3": (8e6, {"rope_type": "linear", "factor": 4.0}, {"full_attention"}),  # global layers only
    "olmo2": (8e6, None, {None}),
    "olmo3": (None, YARN_X4, {"full_attention"}),
    "phi3": (None, LONGROPE | {"short_factor": [1.0] * 8, "long_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0]},
             {None}),
    "phi4-mini": (None, LONGROPE, {None}),  # partial rotary: 3/4 of each head rotates
}


def _rotations(model, length: int = 300) -> dict:
    """Layer type (None: one RoPE for all layers) -> the cos the model rotates positions 0..length-1 by
    (after its dynamic updates: Phi-3's longrope switches factors beyond the original window)."""
    rotary, positions = model.model.rotary_emb, torch.arange(length)[None]
    types_ = [n.removesuffix("_inv_freq") for n, _ in rotary.named_buffers() if n.endswith("_inv_freq")
              and "original" not in n]
    x = torch.zeros(1, length, 1)
    with torch.no_grad():
        return {t: rotary(x, positions, t)[0] for t in types_} if types_ else {None: rotary(x, positions)[0]}


def _by_layer_type(params: dict) -> dict:
    return {k: dict(v) for k, v in params.items()} if all(isinstance(v, dict) for v in params.values()) else {None: dict(params)}


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_settings_apply_per_family_and_reload_with_the_same_logits(family, tmp_path):
    theta, scaling, changed = ROPE_SETTINGS[family]
    config = family_config(family)
    before = _by_layer_type(config.rope_parameters)
    base = _rotations(family_model(family))
    apply_rope_settings(config, theta, scaling, max_length=1024)
    after = _by_layer_type(config.rope_parameters)
    assert {key for key in before if after[key] != before[key]} == changed
    assert config.max_position_embeddings == 1024
    if family == "phi4-mini":
        assert after[None]["partial_rotary_factor"] == 0.75
    torch.manual_seed(0)
    model = type(family_model(family))(config).eval()
    moved = {key for key, cos in _rotations(model).items() if not torch.equal(cos, base[key])}
    assert moved == changed  # the model's frequencies moved where the settings went, and only there
    model.save_pretrained(tmp_path)
    reloaded = load_model(ModelConfig(model_name_or_path=str(tmp_path), attn_implementation="eager"), 1024).eval()
    assert _by_layer_type(reloaded.config.rope_parameters) == after
    ids = torch.randint(3, VOCAB, (1, 300), generator=torch.Generator().manual_seed(2))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


@pytest.mark.parametrize("family,theta,scaling,reason", [
    ("phi3", None, YARN_X4, r"Phi3Config cannot take .*type field must be one of \['longrope'\]"),
    ("phi4-mini", None, LONGROPE | {"short_factor": [1.0] * 8}, "short_factor field must have length 6"),
    ("llama-3.x", None, {"full_attention": {"rope_theta": 1e6}}, "one RoPE for all layers"),
    ("gemma3", None, {"global": {"rope_theta": 1e6}}, "no layer type global; its layer types are"),
])
def test_a_rope_setting_the_family_cannot_take_is_refused_with_the_reason(family, theta, scaling, reason):
    with pytest.raises(RecipeError, match=reason):
        apply_rope_settings(family_config(family), theta, scaling, max_length=1024)


def test_gemma3_rope_keyed_by_layer_type_sets_each_type():
    config = family_config("gemma3")
    apply_rope_settings(config, None, {"sliding_attention": {"rope_theta": 2e4}, "full_attention": {"factor": 2.0}}, 1024)
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 2e4
    assert config.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}


# -- chat templates and LoRA SFT ------------------------------------------------------------------

TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"
# TRL ships the Qwen, Llama 3.1, Gemma and Phi-3 templates; Mistral's, OLMo's and Phi-4-mini's are
# written out here in their published form (no hub access)
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
OLMO2 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
         "{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
         "{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
         "{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}{% else %}"
         "{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}{% endif %}"
         "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PHI4_MINI = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")


def _trl(name: str) -> str:
    return (TRL_TEMPLATES / f"{name}.jinja").read_text()


# family -> template, special tokens (eos first), bos, what surrounds each assistant turn's content in the loss
CHAT = {
    "qwen2.5": (_trl("qwen2_5"), ["<|im_end|>", "<|im_start|>", "<|endoftext|>"], None, ("", "<|im_end|>")),
    "qwen3": ((REPO / "recipes/qwen3-0.6b/chat_template.jinja").read_text(),
              ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "<think>", "</think>"], None,
              ("<think>\n\n</think>\n\n", "<|im_end|>")),
    "llama-3.x": (_trl("llama3_1"), ["<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
                  "<|begin_of_text|>", ("", "<|eot_id|>")),
    "mistral": (MISTRAL, ["</s>", "<s>", "[INST]", "[/INST]"], "<s>", ("", "</s>")),
    "gemma2": (_trl("gemma"), ["<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", ("", "<end_of_turn>")),
    "gemma3": (_trl("gemma3"), ["<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", ("", "<end_of_turn>")),
    "olmo2": (OLMO2, ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"], "<|endoftext|>", ("", "<|endoftext|>")),
    "olmo3": (CHATML, ["<|im_end|>", "<|im_start|>", "<|endoftext|>"], None, ("", "<|im_end|>")),
    "phi3": (_trl("phi3"), ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"], None,
             ("", "<|end|>\n<|endoftext|>")),
    "phi4-mini": (PHI4_MINI, ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"], None,
                  ("", "<|end|><|endoftext|>")),
}
# These templates end a chat with eos_token unless a generation prompt follows, so an earlier turn is
# not rendered as a prefix of the whole chat: multi-turn chats are refused (docs/families.md).
SINGLE_TURN_ONLY = {"phi3", "phi4-mini"}


def family_tokenizer(family: str):
    template, specials, bos, _ = CHAT[family]
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200)]
    tokenizer = bpe_tokenizer(corpus, 300, specials, byte_alphabet=True, eos_token=specials[0],
                              pad_token=specials[0], **({"bos_token": bos} if bos else {}))
    tokenizer.chat_template = template
    return tokenizer


def conversations(n: int, turns: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [[m for _ in range(turns) for m in ({"role": "user", "content": words(rng.randint(2, 8))},
                                                {"role": "assistant", "content": words(rng.randint(1, 10))})]
            for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_chat_template_masks_only_the_assistant_turns(family):
    from datasets import Dataset

    from prolong.sft_data import prepare_sft_dataset

    tokenizer = family_tokenizer(family)
    before, after = CHAT[family][3]
    turns = 1 if family in SINGLE_TURN_ONLY else 2
    chats = conversations(6, turns)
    rows, stats = prepare_sft_dataset(Dataset.from_dict({"messages": chats}), tokenizer, 512)
    assert stats.kept == len(chats)
    for chat, row in zip(chats, rows):
        targets = [t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m]
        expected = "".join(before + m["content"] + after for m in chat if m["role"] == "assistant")
        assert tokenizer.decode(targets) == expected
    if family in SINGLE_TURN_ONLY or family == "qwen3":  # qwen3: its own template, without the recipe's
        if family == "qwen3":
            tokenizer.chat_template = _trl("qwen3")
        with pytest.raises(Exception, match="prefix by prefix"):
            prepare_sft_dataset(Dataset.from_dict({"messages": conversations(2, 2)}), tokenizer, 512)


def save_family_model(family: str, path, **overrides) -> str:
    tokenizer = family_tokenizer(family)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    model = family_model(family, **ids, **overrides)
    model.generation_config.update(**ids)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_chats(path, family: str, n: int = 16) -> str:
    turns = 1 if family in SINGLE_TURN_ONLY else 2
    with open(path, "w") as f:
        for messages in conversations(n, turns, seed=3):
            f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


SFT_FLAGS = ["--max_length", "384", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
             "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_sft_trains_on_the_family_chat_template(family, tmp_path):
    """run_sft with a LoRA adapter, the attention auto picks, packed chats (the masking probe runs on
    TRL's collator before training): an adapter is saved and moves the model's output."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prolong.run_sft import main

    base = save_family_model(family, tmp_path / "base")
    out = main(["--model_name_or_path", base, "--dataset_name", write_chats(tmp_path / "chat.jsonl", family),
                "--output_dir", str(tmp_path / "lora"), "--use_peft", "true", "--lora_r", "4", "--max_steps", "2",
                "--activation_checkpointing", "false", *SFT_FLAGS])
    assert json.loads((Path(out) / "adapter_config.json").read_text())["r"] == 4
    ids = torch.randint(3, 290, (1, 24), generator=torch.Generator().manual_seed(4))
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        before = model(ids).logits
        after = PeftModel.from_pretrained(model, out).eval()(ids).logits
    assert (before - after).abs().max() > 1e-4


# -- the family recipes, end to end on CPU --------------------------------------------------------

RECIPES = {"qwen3": "recipes/qwen3-0.6b", "gemma3": "recipes/gemma3-1b"}
TINY = ["--max_length", "128", "--per_device_train_batch_size", "1", "--global_batch_size", "1", "--max_steps", "1",
        "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true"]


@pytest.mark.slow
@pytest.mark.parametrize("family", RECIPES)
def test_the_family_recipe_runs_cpt_sft_and_evaluation_on_a_tiny_model(family, tmp_path):
    """The recipe as written (its RoPE extension, backend choice, SFT template) on a tiny random model
    of the family at its real 32K window: CPT -> SFT -> `python -m evaluation.run`; only paths, lengths
    and step counts are overridden."""
    from transformers import AutoConfig

    from evaluation.run import main as evaluate
    from prolong.run_cpt import main as cpt
    from prolong.run_sft import main as sft

    recipe = RECIPES[family]
    base = save_family_model(family, tmp_path / "base", max_position_embeddings=32768)
    data = write_packed_dataset(str(tmp_path / "packed"), random_documents(24, 290, 20, 120, 5), 128, "books")
    cpt_out = cpt([f"{recipe}/cpt.yaml", "--model_name_or_path", base, "--dataset_mixture", json.dumps({data: 1.0}),
                   "--output_dir", str(tmp_path / "cpt"), *TINY])
    rope = AutoConfig.from_pretrained(cpt_out).rope_parameters
    if family == "qwen3":
        assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0
    else:  # the global layers only
        assert rope["full_attention"]["factor"] == 4.0 and rope["sliding_attention"]["rope_type"] == "default"
    sft_out = sft([f"{recipe}/sft.yaml", "--model_name_or_path", cpt_out, "--output_dir", str(tmp_path / "sft"),
                   "--dataset_name", write_chats(tmp_path / "chat.jsonl", family), "--save_strategy", "no", *TINY])
    assert AutoConfig.from_pretrained(sft_out).rope_parameters == rope  # SFT keeps the CPT's RoPE
    evaluate(["--model", sft_out, "--tasks", "json_kv", "--lengths", "256", "--max_samples", "1",
              "--generation_max_length", "4", "--output_dir", str(tmp_path / "eval"), "--plots", "false"])
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert scores["results"][0]["status"] == "ok" and scores["results"][0]["n"] == 1
