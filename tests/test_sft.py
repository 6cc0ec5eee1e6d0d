"""SFT: assistant-only masks for real chat templates, packed == unpacked token-mean loss, LoRA,
RoPE kept from the CPT checkpoint, and bad inputs failing early with a fix."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import train_tiny_tokenizer
from helpers import chat_conversations, sentence, sft_argv, write_chat_jsonl
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from prolong.config import ModelConfig, RecipeError, SFTModelConfig, SFTRecipeConfig, parse_recipe
from prolong.model import load_model
from prolong.sft_data import SFTDataError, conversation_tokens, dataset_kind, prepare_sft_dataset

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _masked_runs(tokenizer, input_ids, mask):
    """Decoded text of each maximal run of masked (loss) tokens."""
    runs, current = [], []
    for token, bit in zip(input_ids, mask):
        if bit:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def _llama3_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    corpus = [sentence(rng, 40) for _ in range(200)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all bytes, "\n" too
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_TEMPLATE
    return fast


def _sentencepiece_vicuna_tokenizer():
    """SentencePiece-style (Metaspace) tokens with a Vicuna-style template: the prompt ends with
    "ASSISTANT: " and the tokenizer merges that space into the first word ("▁The")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEGHIJKLMNOPRSTUVWY:\n▁.?,")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet)
    tok.train_from_iterator([sentence(rng, 40) for _ in range(200)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + m['content'] + '</s>\n' }}"
        "{% else %}{{ m['role'].upper() + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"
    )
    return fast


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from prolong.demo.smollm2 import load_smollm2_tokenizer

    return load_smollm2_tokenizer()


# ---------------------------------------------------------------------------------------------
# Masks


@pytest.mark.parametrize("template", ["chatml-smollm2", "llama3", "sentencepiece-vicuna"])
def test_mask_covers_exactly_assistant_content_and_end_token(template, request):
    if template == "chatml-smollm2":
        tokenizer, end = request.getfixturevalue("smollm2_tokenizer"), "<|im_end|>"
        assert "{% generation %}" not in tokenizer.chat_template
    elif template == "llama3":
        tokenizer, end = _llama3_tokenizer(), "<|eot_id|>"
    else:  # the first word's token starts in the prompt's trailing space and must still be a target
        tokenizer, end = _sentencepiece_vicuna_tokenizer(), "</s>"
    for messages in chat_conversations(6, seed=3, turns=3):
        input_ids, mask = conversation_tokens(tokenizer, messages)
        assert len(input_ids) == len(mask)
        expected = [m["content"] + end for m in messages if m["role"] == "assistant"]
        assert _masked_runs(tokenizer, input_ids, mask) == expected
        # the whole rendered conversation is there: masks are on the real training tokens
        decoded, rendered = tokenizer.decode(input_ids), tokenizer.apply_chat_template(messages, tokenize=False)
        if template == "sentencepiece-vicuna":  # Metaspace decoding spaces special tokens differently
            decoded, rendered = "".join(decoded.split()), "".join(rendered.split())
        assert decoded.startswith(rendered)


def test_prompt_completion_rows_mask_the_prompt():
    tokenizer = train_tiny_tokenizer()
    data = Dataset.from_dict({"prompt": ["the of and to"], "completion": [" in is that"]})
    rows, stats = prepare_sft_dataset(data, tokenizer, max_length=64)
    assert stats.kind == "prompt_completion" and rows.column_names == ["input_ids", "completion_mask"]
    assert _masked_runs(tokenizer, rows[0]["input_ids"], rows[0]["completion_mask"]) == [" in is that<|im_end|>"]


# ---------------------------------------------------------------------------------------------
# Packed == unpacked, token-averaged over micro-batches


def _sft_config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_length=256,
                  per_device_train_batch_size=4, activation_checkpointing=False, logging_steps=1,
                  dataloader_drop_last=False, save_strategy="no")
    values.update(overrides)
    return SFTRecipeConfig(**values)


@pytest.mark.slow
def test_packed_loss_equals_unpacked_token_mean(tiny_model_dir, tmp_path):
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_model(ModelConfig(model_name_or_path=tiny_model_dir, attn_implementation="sdpa"))
    conversations = chat_conversations(12, seed=5)
    rows, _ = prepare_sft_dataset(Dataset.from_dict({"messages": conversations}), tokenizer, 256)
    args = _sft_config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    assert trainer.model_accepts_loss_kwargs  # so the Trainer counts tokens over the whole step

    # One optimizer step = 2 micro-batches of padding-free rows, each holding several conversations.
    batches, num_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 2, torch.device("cpu"))
    assert all("attention_mask" not in b and (b["position_ids"] == 0).sum() > 2 for b in batches)
    model.eval()
    with torch.no_grad():
        packed = sum(trainer.compute_loss(model, dict(b), num_items_in_batch=num_items) for b in batches)

        # The same conversations one by one: sum of assistant-token cross-entropies / their count.
        total, count = 0.0, 0
        for batch in batches:
            labels = batch["labels"][0]
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [labels.numel()]
            for start, end in zip(starts[:-1], starts[1:]):
                logits = model(input_ids=batch["input_ids"][:, start:end]).logits[0, :-1]
                target = labels[start + 1 : end]
                total += F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum")
                count += int((target != -100).sum())
    assert int(num_items) == count
    torch.testing.assert_close(packed, total / count, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_prepacked_prolong_data_rows_keep_boundaries_and_masks(tiny_model_dir, tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from prolong.data.pack import pack_dataset
    from prolong.data.tokenize import tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    raw = Dataset.from_dict({"messages": chat_conversations(10, seed=7)})
    tokenized, _ = tokenize_dataset(raw, tokenizer, text_field="messages")
    pack_dataset(tokenized, tmp_path / "packed", mode="sft", length=128)
    from prolong.sft_data import load_sft_dataset

    rows, stats = prepare_sft_dataset(load_sft_dataset(str(tmp_path / "packed")), tokenizer, 128)
    assert stats.kind == "packed" and rows.column_names == ["input_ids", "labels", "seq_lengths"]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([rows[0], rows[1]])
    lengths = rows[0]["seq_lengths"] + rows[1]["seq_lengths"]
    starts = torch.tensor([0] + lengths).cumsum(0)[:-1]
    assert torch.equal((batch["position_ids"][0] == 0).nonzero().flatten(), starts)
    assert (batch["labels"][0, starts] == -100).all()  # no target crosses a conversation boundary
    assert (batch["labels"] != -100).sum() == sum((torch.tensor(r["labels"]) != -100).sum() for r in (rows[0], rows[1]))

    from prolong.run_sft import main  # and the entry point trains on them as they are

    out = main(sft_argv(tiny_model_dir, str(tmp_path / "packed"), str(tmp_path / "sft")))
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    longest = max(len(ids) for ids in rows["input_ids"])  # the card states the rows' length, not max_length
    assert f"training sequence length: {longest} tokens" in open(os.path.join(out, "README.md")).read()


# ---------------------------------------------------------------------------------------------
# End to end: RoPE kept from the CPT checkpoint, chat template saved; LoRA adapter


@pytest.fixture(scope="module")
def cpt_checkpoint(tiny_model_dir, tmp_path_factory):
    """A stage output with a raised theta, saved the way run_cpt saves it (load_model + save)."""
    path = str(tmp_path_factory.mktemp("cpt-output"))
    model = load_model(ModelConfig(model_name_or_path=tiny_model_dir, rope_theta=5e5))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


@pytest.mark.slow
def test_sft_keeps_the_checkpoint_rope_and_saves_the_chat_template(cpt_checkpoint, tmp_path):
    from prolong.run_sft import main

    too_long = [{"role": "user", "content": "the " * 200}, {"role": "assistant", "content": "of"}]
    data = write_chat_jsonl(tmp_path / "chat.jsonl", chat_conversations(16, seed=9) + [too_long])
    out = main(sft_argv(cpt_checkpoint, data, str(tmp_path / "sft")))
    config = AutoConfig.from_pretrained(out)
    assert config.rope_parameters["rope_theta"] == 5e5
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == AutoTokenizer.from_pretrained(cpt_checkpoint).chat_template
    assert "sft" in open(os.path.join(out, "README.md")).read()
    with open(os.path.join(out, "trainer_state.json")) as f:
        assert any(entry.get("tokens_per_second", 0) > 0 for entry in json.load(f)["log_history"])

    # ... unless the recipe overrides it
    model_cfg, args = parse_recipe((SFTModelConfig, SFTRecipeConfig), sft_argv(cpt_checkpoint, data, "x", "--rope_theta", "1e6"))
    assert load_model(model_cfg, args.max_length).config.rope_parameters["rope_theta"] == 1e6


@pytest.mark.slow
def test_lora_run_saves_an_adapter_that_changes_the_output(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from prolong.run_sft import main

    data = write_chat_jsonl(tmp_path / "chat.jsonl", chat_conversations(16, seed=11))
    out = main(sft_argv(tiny_model_dir, data, str(tmp_path / "lora"), "--use_peft", "true", "--lora_r", "4"))
    adapter = json.load(open(os.path.join(out, "adapter_config.json")))
    assert adapter["r"] == 4 and not os.path.exists(os.path.join(out, "model.safetensors"))
    ids = torch.tensor([[5, 17, 42, 99, 120, 7]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, out).eval()
        after = tuned(ids).logits
    assert (before - after).abs().max() > 1e-4


@pytest.mark.slow
def test_chat_template_path_renders_a_model_that_has_no_template(tiny_model_dir, tmp_path):
    """`chat_template_path: FILE.jinja` is applied before the assistant masks are computed, and the
    saved tokenizer carries it."""
    import shutil

    from prolong.run_sft import main

    template = AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "no-template")
    bare = AutoTokenizer.from_pretrained(model_dir)
    bare.chat_template = None
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    bare.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).chat_template is None
    (tmp_path / "chat.jinja").write_text(template, encoding="utf-8")
    data = write_chat_jsonl(tmp_path / "chat.jsonl", chat_conversations(8, seed=5))
    out = main(sft_argv(str(model_dir), data, str(tmp_path / "out"), "--chat_template_path", str(tmp_path / "chat.jinja")))
    assert AutoTokenizer.from_pretrained(out).chat_template == template


def test_lora_fields_are_trls_and_a_single_target_module_stays_a_module_name(tiny_model_dir):
    """trl.get_peft_config builds the adapter from SFTModelConfig (trl.ModelConfig's LoRA fields);
    the default is peft's all-linear, and a one-name lora_target_modules stays a module name (trl's
    own ModelConfig turns it into a string, which peft matches as a regex against the whole module
    path: no module would match)."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from trl import get_peft_config

    base = ["--model_name_or_path", tiny_model_dir, "--use_cpu", "true", "--use_peft", "true"]
    model_cfg, _ = parse_recipe((SFTModelConfig, SFTRecipeConfig), base)
    assert get_peft_config(model_cfg).target_modules == "all-linear"
    flags = ["--lora_r", "4", "--lora_target_modules", "q_proj", "--use_rslora", "true"]
    model_cfg, _ = parse_recipe((SFTModelConfig, SFTRecipeConfig), base + flags)
    config = get_peft_config(model_cfg)
    assert (config.r, config.use_rslora, config.target_modules, config.task_type) == (4, True, {"q_proj"}, "CAUSAL_LM")
    model = get_peft_model(load_model(ModelConfig(model_name_or_path=tiny_model_dir)), config)
    wrapped = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert wrapped == {"q_proj"}


def test_lora_keys_the_loader_ignores_are_not_recipe_keys():
    with pytest.raises(RecipeError, match="Unknown key 'load_in_4bit'"):
        parse_recipe((SFTModelConfig, SFTRecipeConfig), ["--model_name_or_path", "x", "--load_in_4bit", "true"])


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors before TRL


def test_bad_datasets_fail_with_a_fix():
    tokenizer = train_tiny_tokenizer()
    with pytest.raises(SFTDataError, match="needs `messages`"):
        dataset_kind(["text", "id"])
    bad_role = Dataset.from_dict({"messages": [[{"role": "human", "content": "the"}, {"role": "gpt", "content": "of"}]]})
    with pytest.raises(SFTDataError, match="unknown role 'human'"):
        prepare_sft_dataset(bad_role, tokenizer, 64)
    no_template = train_tiny_tokenizer()
    no_template.chat_template = None
    with pytest.raises(SFTDataError, match="chat_template_path"):
        prepare_sft_dataset(Dataset.from_dict({"messages": chat_conversations(2)}), no_template, 64)


def test_too_long_and_untrainable_conversations_are_dropped_and_counted():
    tokenizer = train_tiny_tokenizer()
    conversations = chat_conversations(5, seed=1) + [
        [{"role": "user", "content": "the " * 300}, {"role": "assistant", "content": "of"}],
        [{"role": "user", "content": "no reply"}],
    ]
    rows, stats = prepare_sft_dataset(Dataset.from_dict({"messages": conversations}), tokenizer, max_length=256)
    assert (stats.examples, stats.kept, stats.dropped_too_long, stats.dropped_no_target) == (7, 5, 1, 1)
    assert max(len(ids) for ids in rows["input_ids"]) <= 256


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--average_tokens_across_devices", "false"], "per-device means"),
        (["--assistant_only_loss", "true"], "already masks"),
        (["--packing_strategy", "wrapped"], "use bfd"),
        (["--lora_alhpa", "8"], "Did you mean 'lora_alpha'"),
    ],
)
def test_recipe_refuses_configurations_that_break_the_loss(flags, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe((SFTModelConfig, SFTRecipeConfig), ["--model_name_or_path", "x", "--use_cpu", "true", *flags])


def test_recipes_parse():
    for recipe in ("recipes/prolong-8b/sft.yaml", "recipes/prolong-8b/sft-lora.yaml", "recipes/tiny/sft.yaml"):
        model_cfg, args = parse_recipe((SFTModelConfig, SFTRecipeConfig), [recipe, "--use_cpu", "true"])
        assert args.packing and args.packing_strategy == "bfd" and args.average_tokens_across_devices
    assert args.model_init_kwargs is None and model_cfg.model_name_or_path == "outputs/tiny-cpt"


# ---------------------------------------------------------------------------------------------
# The start-up probe runs the collator SFT trains with


def test_masking_probe_runs_the_sft_trainers_own_collator(tiny_model_dir, tmp_path):
    """The probe packs its two documents as TRL's trainer packs rows (bfd: `seq_lengths`) and runs
    them through the trainer's own collator: a collator that mixes packed rows is refused."""
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from prolong.training.attention import DocumentMaskingError, guard_document_masking

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_model(ModelConfig(model_name_or_path=tiny_model_dir, attn_implementation="sdpa"))
    rows, _ = prepare_sft_dataset(Dataset.from_dict({"messages": chat_conversations(12, seed=3)}), tokenizer, 256)
    args = _sft_config(tmp_path)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    assert "seq_lengths" in trainer.train_dataset.column_names  # TRL's bfd rows

    seen = []

    def recording(collate):
        def run(examples):
            batch = collate(examples)
            seen.append((examples, batch))
            return batch
        return run

    trainer.data_collator = recording(trainer.data_collator)
    guard_document_masking(trainer.model, args, trainer.data_collator, trainer.train_dataset, packed=args.packing)
    examples, batch = seen[0]
    assert set(examples[0]) == set(trainer.train_dataset[0])  # laid out like the training rows
    assert "attention_mask" not in batch and (batch["position_ids"][0] == 0).sum() == 2

    # TRL's collator without padding-free masking attends across the row: the probe must refuse it
    mixing = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=False)
    with pytest.raises(DocumentMaskingError, match="DataCollatorForLanguageModeling"):
        guard_document_masking(trainer.model, args, mixing, trainer.train_dataset, packed=args.packing)
