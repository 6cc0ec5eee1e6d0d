"""Time per sample of RULER's 13 tasks (evaluation/tasks/ruler.py), beside the HELMET recall tasks as baseline.

    python benchmarks/bench_eval_ruler.py --lengths 4096,16384 --samples 3

For each (task, length), in one process: the task's size search (`prepare`, once per run), the drawing of one
sample (RULER's loop body, fitted with SmolLM2's tokenizer), and the model's time for one sample: prompt ids,
then greedy decoding of the task's generation budget by `evaluation.generation.HFGenerator` (the runner's code
path, prefill chunks of 8192) on a tiny random Llama (`--hidden`, `--layers`; SmolLM2's vocabulary). The
tokenizer, the model and the data are loaded before any clock starts. RULER's data are the test fixtures
(tests/fixtures/ruler/data: a short essay excerpt and a few QA documents, repeated to the length), so the
sentence splitting and document counts are RULER's but the text repeats. Medians over `--samples` samples; the
random model may stop early at its end-of-sequence token, so the new tokens are reported beside the budget.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = ["json_kv", "ruler_mk_needle", "ruler_mk_uuid", "ruler_mv"]  # HELMET's recall (evaluation/synthetic.py)


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, REPO)
    from evaluation.generation import HFGenerator, PromptBuilder
    from prolong.demo.smollm2 import load_smollm2_tokenizer

    tokenizer = load_smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max(args.lengths) * 2, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return tokenizer, PromptBuilder(tokenizer), HFGenerator(model, tokenizer, prefill_chunk_size=8192)


def time_task(name: str, length: int, args, tokenizer, builder, generator) -> dict:
    import torch

    from evaluation.tasks import LoadRequest, get_task, ruler

    task = get_task(name)
    budget = length - task.generation_max_length
    request = LoadRequest(length=length, input_budget=budget, max_samples=args.samples, seed=42, shots=task.shots,
                          data_dir=os.path.join(REPO, "tests", "fixtures", "ruler", "data"),
                          count_tokens=builder.count(task, False), length_tokenizer=tokenizer)
    row = {"task": name, "length": length, "prepare_s": None}
    start = time.perf_counter()
    if task.category == "ruler":
        run = ruler.prepared_generator(task.extra["ruler_task"], request)
        row["prepare_s"] = time.perf_counter() - start
        draws = []
        for _ in range(args.samples):
            start = time.perf_counter()
            run.draw()
            draws.append(time.perf_counter() - start)
        row["draw_s"] = statistics.median(draws)
        samples = task.load(task, request)  # the same samples, from the cached search
    else:  # HELMET's recall tasks: one search per sample, no separate preparation
        samples = task.load(task, request)
        row["draw_s"] = (time.perf_counter() - start) / len(samples)
    model_times, tokens, new_tokens = [], [], []
    with torch.no_grad():
        for sample in samples:
            start = time.perf_counter()
            ids, _ = builder.truncated_ids(task, sample, False, budget)
            output = generator.generate(ids, task.generation_max_length, False)
            model_times.append(time.perf_counter() - start)
            tokens.append(len(ids))
            new_tokens.append(len(tokenizer(output, add_special_tokens=False)["input_ids"]))
    row.update(model_s=statistics.median(model_times), prompt_tokens=statistics.median(tokens),
               budget_tokens=task.generation_max_length, new_tokens=statistics.median(new_tokens))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tasks", default=None, help="comma-separated (default: the 13 RULER tasks + baseline)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    import torch

    from evaluation.tasks import TASKS
    names = args.tasks.split(",") if args.tasks else [n for n, t in TASKS.items() if t.category == "ruler"] + BASELINE
    tokenizer, builder, generator = build(args)
    rows = []
    for length in args.lengths:
        for name in names:
            rows.append(time_task(name, length, args, tokenizer, builder, generator))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch "
          f"{torch.__version__}; tiny Llama hidden {args.hidden}, {args.layers} layers, SmolLM2 tokenizer; median of "
          f"{args.samples} samples\n")
    print("| task | length | size search (s, once per run) | draw (s / sample) | prompt tokens | new tokens (budget) | "
          "model (s / sample) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        search = "-" if r["prepare_s"] is None else f"{r['prepare_s']:.2f}"
        print(f"| {r['task']} | {r['length']} | {search} | {r['draw_s']:.3f} | {r['prompt_tokens']:.0f} | "
              f"{r['new_tokens']:.0f} ({r['budget_tokens']}) | {r['model_s']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
