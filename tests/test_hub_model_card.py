"""Model cards the Hub can read: base_model, datasets, pipeline_tag, tags and a model-index of HELMET
scores per category and length, written at training time or added by `evaluation.run --update-card`."""

from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import ModelCard

from evaluation.run import main as evaluation_main
from prolong.model_card import write_model_card


def _card(directory, mixture=None, log_history=None, base_model="HuggingFaceTB/SmolLM2-135M"):
    write_model_card(str(directory), name="tiny-prolong", load_path=str(directory), base_model=base_model,
                     stage="continued-pretraining", recipe={"learning_rate": 1e-3, "hub_token": "hf_x"},
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_length=128, mixture=mixture,
                     log_history=log_history)
    return ModelCard.load(directory / "README.md")


def test_card_yaml_names_base_model_hub_datasets_and_the_callbacks_recall_scores(tmp_path):
    pushed = tmp_path / "books"
    pushed.mkdir()
    (pushed / "prolong_hub.json").write_text(json.dumps({"repo_id": "my-org/prolong-books", "config": "books"}))
    local = tmp_path / "local-only"
    local.mkdir()
    mixture = {str(pushed): 0.5, str(local): 0.2, "hf://datasets/my-org/prolong-code/code": 0.3}
    history = [{"loss": 3.0, "step": 1},
               {"eval_recall/json_kv_128": 40.0, "eval_recall/avg_128": 40.0, "eval_recall/avg_256": 12.5, "step": 2}]
    card = _card(tmp_path, mixture, history)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert card.data.datasets == ["my-org/prolong-books", "my-org/prolong-code"]  # the local-only one is no Hub id
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    assert {"prolong", "long-context", "continued-pretraining"} <= set(card.data.tags)
    results = {(r.dataset_config, r.metric_args["input_length"]): r.metric_value for r in card.data.eval_results}
    assert results == {("recall", 128): 40.0, ("recall", 256): 12.5}
    assert "Recall evaluation at the last checkpoint" in card.text and "hf_x" not in card.content


def test_an_sft_card_names_its_hub_dataset(tmp_path):
    write_model_card(str(tmp_path), name="sft", load_path=str(tmp_path), base_model="org/base", stage="sft",
                     recipe={"dataset_name": "HuggingFaceH4/ultrachat_200k"}, rope_parameters=None, max_length=64)
    assert ModelCard.load(tmp_path / "README.md").data.datasets == ["HuggingFaceH4/ultrachat_200k"]


def test_update_card_from_an_evaluation_run_puts_every_category_and_length_in_the_model_index(
        tiny_model_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    before = _card(model_dir, log_history=[{"eval_recall/avg_128": 1.0, "step": 1}])
    assert len(before.data.eval_results) == 1
    out = tmp_path / "eval"
    evaluation_main(["--model", str(model_dir), "--lengths", "128,256", "--max_samples", "1", "--tasks",
                     "json_kv", "--plots", "false", "--generation_max_length", "8",
                     "--output_dir", str(out), "--update-card", str(model_dir)])
    scores = json.loads((out / "scores.json").read_text())
    card = ModelCard.load(model_dir / "README.md")
    results = {(r.dataset_config, r.metric_args["input_length"]): r.metric_value for r in card.data.eval_results}
    expected = {(category, int(length)): round(value, 2) for category, by_length in scores["categories"].items()
                for length, value in by_length.items() if value is not None}
    assert expected and results == expected  # the callback's recall score was replaced, not kept beside
    assert all(r.dataset_type == "princeton-nlp/HELMET" and r.task_type == "text-generation"
               for r in card.data.eval_results)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"  # the rest of the card is kept
    assert "## Recipe" in card.text and "Scores (0-100) from HELMET-style evaluation" in card.text
    assert "model-index updated" in capsys.readouterr().out


def test_update_card_without_a_card_fails_before_evaluating(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluation_main(["--model", str(tmp_path), "--update-card", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "not found" in err and "nope/README.md" in err and "Traceback" not in err


def test_update_card_keeps_one_header_when_the_header_holds_dashes(tmp_path):
    """A model named run---2 (its output_dir's name): the card keeps one YAML header and its body."""
    from prolong.model_card import update_model_card

    write_model_card(str(tmp_path), name="run---2", load_path=str(tmp_path), base_model="org/base", stage="sft",
                     recipe={}, rope_parameters=None, max_length=64)
    text = update_model_card(str(tmp_path), {"mode": "helmet", "categories": {"recall": {"8192": 50.0}}})
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.model_name == "run---2" and len(card.data.eval_results) == 1
    assert text.count("model-index:") == 1 and card.text.lstrip().startswith("# run---2")
