"""End-to-end behaviour of prolong/run_cpt.py and CPTTrainer on a tiny real model."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from helpers import PreemptAt, cpt_argv, cpt_trainer, logged_losses, train_log
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

from prolong.training.collator import PackedCollator
from prolong.config import RecipeError
from prolong.training.mixture import MixtureDataset
from prolong.run_cpt import main


@pytest.fixture(scope="module")
def mixture_512(tmp_path_factory) -> dict[str, float]:
    """Two domains packed at 512 tokens, for runs that raise max_length above the base window."""
    from conftest import random_documents, write_packed_dataset

    root = tmp_path_factory.mktemp("packed-512")
    long_dir = write_packed_dataset(str(root / "long"), random_documents(12, 300, 200, 600, 4), 512, "long")
    short_dir = write_packed_dataset(str(root / "short"), random_documents(100, 300, 5, 60, 5), 512, "short")
    return {long_dir: 0.6, short_dir: 0.4}


@pytest.mark.slow
def test_raised_theta_is_saved_and_changes_the_inverse_frequencies(tiny_model_dir, mixture_512, tmp_path):
    out = main(cpt_argv(tiny_model_dir, mixture_512, tmp_path / "run", rope_theta=1e6, max_length=512, max_steps=1))
    config = AutoConfig.from_pretrained(out)
    assert config.rope_parameters["rope_theta"] == 1e6
    assert config.max_position_embeddings == 512  # widened from the base model's 256
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    head_dim = config.hidden_size // config.num_attention_heads
    expected = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    torch.testing.assert_close(trained.model.rotary_emb.inv_freq, expected)
    assert not torch.allclose(base.model.rotary_emb.inv_freq, expected)
    assert logged_losses(out) and all(e["tokens_per_second"] > 0 for e in train_log(out) if "loss" in e)
    card = open(os.path.join(out, "README.md")).read()
    assert "1000000.0" in card and "| 60% |" in card
    # the final save is staged beside output_dir (.run.final-new / .run.final-old) and moved in: nothing is left
    assert os.listdir(tmp_path) == ["run"]


@pytest.mark.slow
def test_max_length_above_the_packed_length_is_refused_or_trained_and_reported_as_packed(
        tiny_model_dir, packed_mixture, mixture_512, tmp_path, caplog):
    """Data packed at 128 with max_length 512 trains on 128-token rows: refused, unless the recipe
    lists the domains under allow_packed_shorter; then the card and config say 128, not 512."""
    with pytest.raises(RecipeError, match=r"packed at 128 tokens.*max_length=512.*allow_packed_shorter"):
        main(cpt_argv(tiny_model_dir, packed_mixture, tmp_path / "refused", max_length=512))
    long_512 = next(p for p in mixture_512 if p.endswith("long"))
    short_128 = next(p for p in packed_mixture if p.endswith("short"))
    with open(os.path.join(short_128, "prolong_data.json")) as f:
        meta = json.load(f)
    long_128 = str(tmp_path / "long-128")  # the same rows, recorded as --mode long
    Dataset.load_from_disk(short_128).save_to_disk(long_128)
    with open(os.path.join(long_128, "prolong_data.json"), "w") as f:
        json.dump(dict(meta, mode="long"), f)
    with pytest.raises(RecipeError, match="--mode long --length 512"):  # long data must reach max_length
        main(cpt_argv(tiny_model_dir, {long_128: 1.0}, tmp_path / "refused", max_length=512,
                   allow_packed_shorter=long_128))

    # short data packed shorter, on purpose, beside long data at max_length: trains at 512
    mixed = main(cpt_argv(tiny_model_dir, {long_512: 0.6, short_128: 0.4}, tmp_path / "mixed", max_length=512,
                       allow_packed_shorter=short_128, max_steps=1))
    assert "training sequence length: 512 tokens" in open(os.path.join(mixed, "README.md")).read()
    # every domain shorter: the run, its card and config.json say 128
    with caplog.at_level("INFO", logger="prolong.training.mixture"):
        short = main(cpt_argv(tiny_model_dir, {short_128: 1.0}, tmp_path / "short", max_length=512,
                           allow_packed_shorter=short_128, max_steps=1))
    assert "training sequence length: 128 tokens" in open(os.path.join(short, "README.md")).read()
    assert AutoConfig.from_pretrained(short).max_position_embeddings == 256  # the base window, not widened to 512
    assert "Training sequence length: 128 tokens" in caplog.text


def test_masking_probe_packs_rows_like_the_mixture_with_the_trainers_collator(tiny_model_dir, packed_mixture):
    from prolong.training.attention import DocumentMaskingError, check_document_masking

    dataset = MixtureDataset(packed_mixture, 128, num_sequences=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    seen = []

    def collate(examples):
        seen.append(examples)
        return PackedCollator()(examples)

    assert check_document_masking(model, collator=collate, sample=dataset[0]) == 0.0
    assert set(seen[0][0]) == set(dataset[0])  # input_ids, indices, domain: a mixture row
    spans_ignored = lambda examples: PackedCollator()([{"input_ids": e["input_ids"]} for e in examples])  # noqa: E731
    with pytest.raises(DocumentMaskingError, match="attend to each other"):
        check_document_masking(model, collator=spans_ignored, sample=dataset[0])


@pytest.mark.slow
def test_preempted_run_resumes_with_the_uninterrupted_loss_curve(tiny_model_dir, packed_mixture, tmp_path):
    # accumulation 2: the data position must count micro-batches, not optimizer steps
    steps = dict(max_steps=6, save_steps=100, per_device_train_batch_size=1, global_batch_size=2)
    reference = logged_losses(main(cpt_argv(tiny_model_dir, packed_mixture, tmp_path / "full", **steps)))

    interrupted = tmp_path / "interrupted"
    main(cpt_argv(tiny_model_dir, packed_mixture, interrupted, **steps), callbacks=[PreemptAt(3)])
    assert sorted(p for p in os.listdir(interrupted) if p.startswith("checkpoint")) == ["checkpoint-3"]
    assert not (interrupted / "config.json").exists()  # an unfinished run presents no final model
    first_part = logged_losses(interrupted / "checkpoint-3")
    resumed = logged_losses(main(cpt_argv(tiny_model_dir, packed_mixture, interrupted, resume_from_checkpoint="true", **steps)))

    assert sorted(resumed) == [1, 2, 3, 4, 5, 6] and sorted(first_part) == [1, 2, 3]
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), step


def _uneven_dataset(path) -> str:
    """Two 128-token rows: one with 3 loss targets (an SFT-style mask), one with about 120."""
    ids = torch.randint(3, 300, (2, 128), generator=torch.Generator().manual_seed(5)).tolist()
    mask = [[1 if 60 <= t < 63 else 0 for t in range(128)], [1] * 128]
    spans = [[[0, 50], [50, 128]], [[0, 30], [30, 90], [90, 128]]]
    Dataset.from_dict({"input_ids": ids, "indices": spans, "mask": mask, "domain": ["a", "b"]}).save_to_disk(path)
    return str(path)


def test_gradient_accumulation_equals_one_big_batch_and_the_global_token_mean(tiny_model_dir, tmp_path):
    long_only = {_uneven_dataset(tmp_path / "uneven"): 1.0}
    common = dict(max_steps=1, optim="sgd", learning_rate=0.5, warmup_steps=0, lr_scheduler_type="constant", max_grad_norm=0)
    accumulated = cpt_trainer(tiny_model_dir, long_only, tmp_path / "a", per_device_train_batch_size=1, gradient_accumulation_steps=2, **common)
    big_batch = cpt_trainer(tiny_model_dir, long_only, tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=1, **common)

    # the global token mean of the step, computed by hand with the initial model
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sums, counts = [], []
    for index in range(2):
        batch = PackedCollator()([accumulated.train_dataset[index]])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        sums.append(F.cross_entropy(logits, batch["shift_labels"][0], ignore_index=-100, reduction="sum").item())
        counts.append((batch["shift_labels"] != -100).sum().item())
    assert counts[0] != counts[1], "the test needs micro-batches with different token counts"
    global_mean = sum(sums) / sum(counts)
    mean_of_means = (sums[0] / counts[0] + sums[1] / counts[1]) / 2
    assert abs(global_mean - mean_of_means) > 1e-4

    accumulated.train()
    big_batch.train()
    assert accumulated.state.log_history[0]["loss"] == pytest.approx(global_mean, rel=1e-4)
    assert big_batch.state.log_history[0]["loss"] == pytest.approx(global_mean, rel=1e-4)
    for (name, a), b in zip(accumulated.model.named_parameters(), big_batch.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


class _RecordOptimizerAtStart(TrainerCallback):
    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.exp_avg = {i: s["exp_avg"].clone() for i, s in optimizer.state_dict()["state"].items()}
        self.base_lrs, self.lr = list(lr_scheduler.base_lrs), optimizer.param_groups[0]["lr"]


def test_stage_handoff_loads_optimizer_state_with_a_fresh_schedule(tiny_model_dir, packed_mixture, tmp_path):
    stage1 = main(cpt_argv(tiny_model_dir, packed_mixture, tmp_path / "stage1", max_steps=2, learning_rate=1e-3))
    saved = torch.load(os.path.join(stage1, "checkpoint-2", "optimizer.pt"), weights_only=True)

    recorder = _RecordOptimizerAtStart()
    argv = cpt_argv(tiny_model_dir, packed_mixture, tmp_path / "stage2", init_from=stage1, load_optimizer_state="true",
                 learning_rate=5e-4, max_steps=2)
    main(argv, [recorder])  # the Trainer's own order: optimizer, accelerate prepare, scheduler
    assert sorted(recorder.exp_avg) == sorted(saved["state"]) and saved["state"]
    for index, state in saved["state"].items():
        torch.testing.assert_close(recorder.exp_avg[index], state["exp_avg"])
    assert recorder.base_lrs == [5e-4] * len(recorder.base_lrs)  # this stage's peak, not stage 1's
    assert recorder.lr == 0.0  # warm-up starts over


@pytest.mark.slow
def test_recall_evaluation_runs_at_checkpoints_and_reaches_the_model_card(tiny_model_dir, mixture_512, tmp_path):
    out = main(cpt_argv(tiny_model_dir, mixture_512, tmp_path / "eval", max_steps=2, save_steps=2, max_length=512,
                     eval_recall_lengths=512, eval_recall_samples=1))
    with open(os.path.join(out, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    recall = [entry for entry in history if any(key.startswith("eval_recall/") for key in entry)]
    scores = {k: v for k, v in recall[-1].items() if k.startswith("eval_recall/")} if recall else {}
    assert scores and all(0.0 <= v <= 100.0 for v in scores.values())  # HELMET's 0-100 scale
    assert os.path.isdir(os.path.join(out, "checkpoint-2", "recall_eval"))
    assert "Recall evaluation at the last checkpoint" in open(os.path.join(out, "README.md")).read()


def test_liger_is_turned_off_without_cuda(tiny_model_dir, packed_mixture, tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with caplog.at_level(logging.WARNING, logger="prolong.config"):
        out = main(cpt_argv(tiny_model_dir, packed_mixture, tmp_path / "liger", max_steps=1, use_liger_kernel="true"))
    assert "use_liger_kernel needs CUDA: turned off" in caplog.text
    saved_args = torch.load(os.path.join(out, "training_args.bin"), weights_only=False)
    assert saved_args.use_liger_kernel is False  # what the run trained with
    from transformers.models.llama import modeling_llama  # Liger patches these classes globally when applied

    assert modeling_llama.LlamaRMSNorm.__module__ == "transformers.models.llama.modeling_llama"
    losses = list(logged_losses(out).values())
    assert losses and all(torch.isfinite(torch.tensor(losses)))  # trained with the chunked loss


def test_a_final_save_without_weights_is_refused(tiny_model_dir, tmp_path):
    from prolong.checkpoint.final_save import require_loadable_weights

    complete = tmp_path / "complete"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(complete)
    require_loadable_weights(str(complete))  # a real saved model passes
    os.remove(complete / "model.safetensors")  # what the Trainer leaves with FSDP's sharded state dict
    with pytest.raises(RuntimeError, match="no loadable model"):
        require_loadable_weights(str(complete))


@pytest.mark.parametrize("fsdp_version", [1, 2])
def test_final_save_under_sharded_fsdp_checkpoints_gathers_full_weights(fsdp_version, tmp_path):
    """accelerate enables FSDP on GPUs only, so the Trainer is stood in for; the plugin is accelerate's."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullStateDictConfig, ShardedStateDictConfig

    from prolong.checkpoint.final_save import save_full_weights

    plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp_version, state_dict_type="SHARDED_STATE_DICT")
    seen = []
    trainer = SimpleNamespace(
        is_fsdp_enabled=True,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
        # transformers' Trainer.save_model writes weights only when this reads FULL_STATE_DICT
        save_model=lambda path: seen.append((str(plugin.state_dict_type), type(plugin.state_dict_config))),
    )
    save_full_weights(trainer, str(tmp_path))
    assert seen == [("StateDictType.FULL_STATE_DICT", FullStateDictConfig)]
    # checkpoints after the final save stay sharded (fast)
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    assert isinstance(plugin.state_dict_config, ShardedStateDictConfig)


def test_a_step_without_any_target_leaves_the_weights_finite(tiny_model_dir, tmp_path):
    """Fully masked rows (prompt-only SFT-style data) can make a whole optimizer step target-free:
    0 / 0 must not reach the optimizer as NaN."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (4, 128), generator=generator).tolist()
    masks = [[0] * 128, [0] * 128, [1] * 128, [1] * 128]
    data = str(tmp_path / "masked")
    Dataset.from_dict({"input_ids": ids, "indices": [[[0, 128]]] * 4, "mask": masks, "domain": ["m"] * 4}).save_to_disk(data)
    out = main(cpt_argv(tiny_model_dir, {data: 1.0}, tmp_path / "run", per_device_train_batch_size=1, max_steps=4))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(entry.get("loss", 0) > 0 for entry in train_log(out))  # the steps with targets still learn


def test_final_save_replaces_an_earlier_models_files_and_keeps_its_card(tiny_model_dir, packed_mixture, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # what an earlier LoRA run left in the same directory: from_pretrained would apply it on top
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    (out / "adapter_model.safetensors").write_bytes(b"stale")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    # as that run's final save recorded them (files no save of ours recorded are the user's, never removed)
    (out / "_prolong_run.json").write_text(json.dumps({"stage": "continued-pretraining", "files": [
        "adapter_config.json", "adapter_model.safetensors", "model-00001-of-00002.safetensors"]}))
    main(cpt_argv(tiny_model_dir, packed_mixture, out, max_steps=1, save_steps=1))
    assert sorted(p.name for p in out.glob("*adapter*")) == [] and not (out / "model-00001-of-00002.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model, "peft_config")

    # push_to_hub's create_model_card must not replace our card (recipe, RoPE, mixture)
    card = (out / "README.md").read_text()
    trainer = cpt_trainer(tiny_model_dir, packed_mixture, out, max_steps=1)
    trainer.create_model_card(model_name="x")
    assert (out / "README.md").read_text() == card


@pytest.mark.slow
def test_another_scheduler_drops_the_cosine_defaults_kwargs(tiny_model_dir, packed_mixture, tmp_path):
    """min_lr_rate belongs to the default cosine_with_min_lr; with linear it crashed after the model loaded."""
    out = main(cpt_argv(tiny_model_dir, packed_mixture, tmp_path / "run", lr_scheduler_type="linear", max_steps=3,
                        warmup_steps=0))
    rates = [entry["learning_rate"] for entry in train_log(out) if "loss" in entry]
    assert len(rates) == 3 and rates[0] > rates[1] > rates[2]  # linear decay to 0
