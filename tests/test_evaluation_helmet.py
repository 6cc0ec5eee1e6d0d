"""HELMET fidelity: our loaders and prompt builder in `helmet` mode reproduce, byte for byte, the
prompts and token ids HELMET's own code builds from the same files (and its scores of canned
outputs). The expected files were produced by running HELMET outside this repository:
tests/fixtures/helmet/README.md."""
import glob
import json
import math
import os

import pytest

from evaluation.generation import PromptBuilder
from evaluation.tasks import LoadRequest, get_task

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "helmet")
DATA = os.path.join(FIXTURES, "fidelity")
EXPECTED = sorted(glob.glob(os.path.join(FIXTURES, "expected", "*.json")))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from prolong.demo.smollm2 import load_smollm2_tokenizer
    return load_smollm2_tokenizer()


def our_samples(case: dict, tokenizer, mode: str = "helmet"):
    task = get_task(case["task"])
    request = LoadRequest(length=case["length"], input_budget=case["length"] - case["gen"],
                          max_samples=case["max_samples"], seed=case["seed"], shots=case["shots"], data_dir=DATA,
                          mode=mode, length_tokenizer=tokenizer)
    return task, request, task.load(task, request)


def mismatches(case: dict, tokenizer) -> list[str]:
    """Every difference from HELMET's expected output for one case, as readable lines."""
    task, request, samples = our_samples(case, tokenizer)
    builder = PromptBuilder(tokenizer)
    problems = []
    if len(samples) != len(case["samples"]):
        return [f"{len(samples)} samples, HELMET {len(case['samples'])}"]
    for index, (ours, theirs) in enumerate(zip(samples, case["samples"])):
        text, _ = builder.text(task, ours, case["chat"])
        if text != theirs["full_prompt"]:
            at = next((i for i, (a, b) in enumerate(zip(text, theirs["full_prompt"])) if a != b),
                      min(len(text), len(theirs["full_prompt"])))
            problems.append(f"sample {index}: prompt differs at char {at}: ours {text[at - 40:at + 40]!r} "
                            f"HELMET {theirs['full_prompt'][at - 40:at + 40]!r}")
            continue
        ids, _ = builder.truncated_ids(task, ours, case["chat"], request.input_budget, mode="helmet")
        if ids != theirs["input_ids"]:
            problems.append(f"sample {index}: token ids differ ({len(ids)} vs HELMET {len(theirs['input_ids'])})")
        for scored in theirs["scores"]:
            metrics = task.score_output(scored["output"], ours, case["chat"], mode="helmet")
            if not set(metrics) & set(scored["metrics"]):  # else a renamed metric would compare nothing
                problems.append(f"sample {index}: no metric in common: ours {sorted(metrics)}, "
                                f"HELMET {sorted(scored['metrics'])}")
            for key in set(metrics) & set(scored["metrics"]):
                if not math.isclose(float(metrics[key]), scored["metrics"][key], abs_tol=1e-9):
                    problems.append(f"sample {index}: {key} of {scored['output']!r} is {metrics[key]}, "
                                    f"HELMET {scored['metrics'][key]}")
    return problems


def test_fixtures_cover_every_task_that_reads_data():
    covered = {json.load(open(path))["task"] for path in EXPECTED}
    assert covered == {"kilt_nq", "kilt_triviaqa", "kilt_hotpotqa", "kilt_popqa_3", "msmarco_rerank_psg",
                       "icl_trec_coarse", "icl_trec_fine", "icl_banking77", "icl_clinic150", "icl_nlu",
                       "narrativeqa", "infbench_qa_eng", "infbench_choice_eng", "infbench_sum_eng", "multi_lexsum"}


@pytest.mark.parametrize("path", EXPECTED, ids=[os.path.basename(p)[:-5] for p in EXPECTED])
def test_helmet_mode_reproduces_helmets_prompts_token_ids_and_scores(path, smollm2_tokenizer):
    with open(path, encoding="utf-8") as f:
        case = json.load(f)
    problems = mismatches(case, smollm2_tokenizer)
    assert not problems, f"{len(problems)} mismatch(es) with HELMET:\n" + "\n".join(problems[:10])


# ---------------------------------------------------------------------------------------------
# the two modes (docs/evaluation.md lists every difference)

def test_helmet_is_the_default_mode_and_never_stops_at_a_newline():
    from evaluation.config import load_config
    from evaluation.tasks import TASKS
    assert load_config()["mode"] == "helmet"
    with pytest.raises(ValueError, match="'mode' must be one of helmet, fixed"):
        load_config(overrides={"mode": "helmett"})
    stops = {name: (t.default_stop_newline("helmet"), t.default_stop_newline("fixed")) for name, t in TASKS.items()}
    assert not any(helmet for helmet, _ in stops.values())  # HELMET's flag name never matched its configs
    assert {name for name, (_, fixed) in stops.items() if fixed} == {
        name for name, t in TASKS.items() if t.category in ("rag", "rerank", "icl")}


def test_answer_prefix_is_restored_before_scoring_without_a_chat_template():
    task = get_task("icl_trec_coarse")
    sample = {"answer": "3", "question": "q", "context": "c"}
    # the model completed "label:"; its own next line holds another label (no newline stop in HELMET)
    assert task.score_output(" 3\nlabel: 5", sample, use_chat_template=False)["exact_match"] == 1.0
    assert task.score(" 3\nlabel: 5", sample)["exact_match"] == 0.0  # the raw output alone parses "5"


def test_infbench_summary_is_parsed_after_answer_in_helmet_mode_only():
    task = get_task("infbench_sum_eng")
    sample = {"answer": ["a b c"]}
    output = "Summary: a b c"
    assert task.score_output(output, sample, True, mode="fixed")["rougeLsum_f1"] == pytest.approx(1.0)
    assert task.score_output(output, sample, True, mode="helmet")["rougeLsum_f1"] < 0.9  # HELMET: "Answer:" parsing


def test_beyond_128k_fixed_mode_keeps_only_books_that_fill_the_context(smollm2_tokenizer):
    """HELMET keeps NarrativeQA books over 131,072 tokens at every length, so at 256K its prompts are
    shorter than nominal (the fixture books have about 150K tokens); `fixed` asks for full books."""
    case = {"task": "narrativeqa", "length": 262144, "gen": 100, "max_samples": 5, "seed": 42, "shots": 0}
    _, _, samples = our_samples(case, smollm2_tokenizer, mode="helmet")
    assert len(samples) == 3 and not any(s["context"].endswith("[the rest of the text is omitted]") for s in samples)
    with pytest.raises(ValueError, match="No document in .*test.jsonl has at least 261844 tokens"):
        our_samples(case, smollm2_tokenizer, mode="fixed")
    at_2k = our_samples({**case, "length": 2048}, smollm2_tokenizer, mode="fixed")[2]
    assert [s["context"] for s in at_2k] == [s["context"] for s in our_samples({**case, "length": 2048},
                                                                                 smollm2_tokenizer)[2]]


def test_evaluate_in_helmet_mode_feeds_the_model_exactly_helmets_token_ids(smollm2_tokenizer, tmp_path):
    """The whole runner (loaders, length tokenizer, prompt cut, records), not only the builder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from evaluation import evaluate
    from evaluation.identity import ids_hash

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=4096, eos_token_id=0, pad_token_id=0))
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit equal: greedy emits id 0 = EOS, one step per sample
    for name in ("kilt_popqa_3_1024_n4", "narrativeqa_2048_n2"):
        with open(os.path.join(FIXTURES, "expected", f"{name}.json"), encoding="utf-8") as f:
            case = json.load(f)
        out = tmp_path / name
        scores = evaluate(model, tokenizer=smollm2_tokenizer, tasks=[case["task"]], lengths=[case["length"]],
                          max_samples=case["max_samples"], shots=case["shots"], data_dir=DATA, output_dir=str(out),
                          plots=False)
        assert scores["mode"] == "helmet" and scores["results"][0]["stop_newline"] is False
        lines = (out / "predictions" / f"{case['task']}_{case['length']}.jsonl").read_text().splitlines()
        assert [json.loads(line)["prompt_sha256"] for line in lines] == [ids_hash(s["input_ids"]) for s in case["samples"]]
