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
    # shots null (ICL): HELMET's count for the length
    request = LoadRequest(length=case["length"], input_budget=case["length"] - case["gen"],
                          max_samples=case["max_samples"], seed=case["seed"], shots=case["shots"], data_dir=DATA,
                          mode=mode, length_tokenizer=tokenizer,
                          count_tokens=PromptBuilder(tokenizer).count(task, task.use_chat_template))
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
                       "narrativeqa", "infbench_qa_eng", "infbench_choice_eng", "infbench_sum_eng", "multi_lexsum",
                       "json_kv", "ruler_mk_needle", "ruler_mk_uuid", "ruler_mv"}
    cases = [json.load(open(path)) for path in EXPECTED]
    # HELMET's demonstration draws (2 shots, two lengths in one run) and an explicit ICL shot count
    assert {c["length"] for c in cases if c["task"] in ("narrativeqa", "multi_lexsum") and c["shots"] == 2} == {2048, 3072}
    assert any(c["task"].startswith("icl_") and c["shots"] == 12 for c in cases)


def test_helmets_unseeded_demo_shuffle_is_datasets_own():
    """The draw we replay is what `Dataset.shuffle()` without a seed does after `np.random.seed`."""
    import numpy as np
    from datasets import Dataset

    from evaluation.tasks.books import helmet_global_shuffles
    pool = Dataset.from_dict({"i": list(range(50))})
    np.random.seed(7)
    theirs = [pool.shuffle().select(range(3))["i"] for _ in range(316)]  # draw 312 meets the 624-word refill
    ours = helmet_global_shuffles(7, [0, 1, 311, 312, 313, 315], 50, 3)
    assert ours == {i: theirs[i] for i in (0, 1, 311, 312, 313, 315)}


def load_case(name: str) -> dict:
    with open(os.path.join(FIXTURES, "expected", f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def test_fixed_mode_keeps_its_own_demonstrations(smollm2_tokenizer):
    """`helmet` mode's NarrativeQA / Multi-LexSum demonstrations are HELMET's draw (the fixture cases
    above); `fixed` keeps its per-sample seeded draw."""
    for name in ("narrativeqa_2048_n2", "multi_lexsum_2048_n2"):
        case = load_case(name)
        helmet = [s["demo"] for s in our_samples(case, smollm2_tokenizer)[2]]
        fixed = [s["demo"] for s in our_samples(case, smollm2_tokenizer, mode="fixed")[2]]
        assert all(fixed) and all(helmet) and fixed != helmet


def test_recall_reads_helmets_files_in_helmet_mode_only_and_generates_other_lengths(smollm2_tokenizer):
    case = load_case("json_kv_4096_n3")
    from_file = our_samples(case, smollm2_tokenizer)[2]
    assert [s["question"] for s in from_file] == [s["question"] for s in case["samples"]]
    for samples in (our_samples(case, smollm2_tokenizer, mode="fixed")[2],  # fixed: always generated
                    our_samples({**case, "length": 2048}, smollm2_tokenizer)[2]):  # no HELMET file at 2K here
        assert samples and all("depth" in s for s in samples)
        assert not {s["question"] for s in samples} & {s["question"] for s in case["samples"]}


def test_a_setting_a_task_does_not_read_is_refused():
    from evaluation.config import load_config
    with pytest.raises(ValueError, match=r"Config key 'shots' \(3, in the command line\) is not read by task\(s\) "
                                         r"ruler_mk_needle, ruler_mv: they take no shots\. Remove 'shots'"):
        load_config(overrides={"tasks": ["json_kv", "ruler_mk_needle", "icl_nlu", "ruler_mv"], "shots": 3})
    assert load_config(overrides={"tasks": ["json_kv", "icl_nlu"], "shots": 3})["shots"] == 3
    assert load_config(overrides={"tasks": ["ruler_mk_needle"], "shots": None})["shots"] is None


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
