"""Time per evaluation sample with and without chunked prefill (transformers' generate(prefill_chunk_size=...)).

    python benchmarks/bench_eval_prefill.py --lengths 2048,8192,16384 --chunk 2048 --new-tokens 16

Each (length, chunked or not) runs in its own process, so its peak memory is its own: a randomly
initialised Llama (`--hidden`, `--layers`) greedily decodes `--new-tokens` tokens after a prompt of
`length` random token ids through `evaluation.generation.HFGenerator`, the runner's code path. One
warm-up sample, then `--repeats` timed ones; the median is reported. Peak memory: CUDA max allocated
on GPU, the process's peak RSS on CPU. Prints a markdown table and, with --json, writes the rows.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args) -> dict:
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, REPO)
    from evaluation.generation import HFGenerator

    cuda = torch.cuda.is_available()
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=max(args.length * 2, 4096),
                         eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype=torch.bfloat16 if cuda else torch.float32,
                                        device="cuda" if cuda else "cpu").eval()

    class Tok:  # HFGenerator needs pad/eos ids and decode only
        pad_token_id, eos_token_id = 0, None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids.tolist()))

    generator = HFGenerator(model, Tok(), prefill_chunk_size=args.chunk if args.chunked else 0)
    ids = torch.randint(1, args.vocab, (args.length,), generator=torch.Generator().manual_seed(1)).tolist()
    generator.generate(ids, args.new_tokens, False)  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, outputs = [], set()
    for _ in range(args.repeats):
        start = time.perf_counter()
        outputs.add(generator.generate(ids, args.new_tokens, False))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"length": args.length, "chunked": args.chunked, "chunk": args.chunk if args.chunked else None,
            "seconds_per_sample": statistics.median(times), "all_seconds": times, "peak_mem_gib": peak / 2**30,
            "output": outputs.pop() if len(outputs) == 1 else None,
            "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                                  f"{torch.get_num_threads()} threads)",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,8192,16384")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for chunked in (False, True):
            cmd = [sys.executable, __file__, "--worker", "--length", str(length), "--chunk", str(args.chunk),
                   "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--hidden", str(args.hidden),
                   "--layers", str(args.layers), "--vocab", str(args.vocab)] + (["--chunked"] if chunked else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"length": length, "chunked": chunked, "error": done.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "output"}), file=sys.stderr)
    print(f"device: {rows[0].get('device')}, torch {rows[0].get('torch')}, transformers {rows[0].get('transformers')}; "
          f"Llama hidden {args.hidden}, {args.layers} layers, {args.new_tokens} new tokens, median of {args.repeats}\n")
    print("| prompt tokens | prefill | s / sample | peak memory (GiB) | same tokens as unchunked |")
    print("|---|---|---|---|---|")
    by_length = {}
    for row in rows:
        by_length.setdefault(row["length"], {})[row["chunked"]] = row
    for length, pair in by_length.items():
        for chunked, row in sorted(pair.items()):
            if "error" in row:
                print(f"| {length} | {'chunks of ' + str(args.chunk) if chunked else 'one pass'} | error: {row['error']} | | |")
                continue
            same = "" if not chunked else ("yes" if row["output"] == pair.get(False, {}).get("output") else "NO")
            print(f"| {length} | {'chunks of ' + str(args.chunk) if chunked else 'one pass'} | "
                  f"{row['seconds_per_sample']:.3f} | {row['peak_mem_gib']:.2f} | {same} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
