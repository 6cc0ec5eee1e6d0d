"""The longest sequence one device can train, per memory option, found by bisection.

    # GPU: Llama-3.2-1B shape, every option, 8K up to 1M tokens at 8K resolution
    python benchmarks/max_context.py --shape llama-3.2-1b --json max_context.json
    # GPU: a yes/no at one length per option (the 512K target), no search
    python benchmarks/max_context.py --shape llama-3.2-1b --check 524288
    # CPU (automatic without CUDA, or --cpu): tiny shape, small lengths
    python benchmarks/max_context.py --cpu

Every probe is ONE training step of the ``prolong`` method of ``bench_train.py`` (our run_cpt.py
step, set up by ``Trainer.train()`` itself so checkpointing, offload and the tiled MLP are really
on: PackedCollator -> CPTTrainer.training_step -> clipping -> AdamW step, so the optimizer state is
in memory) in a fresh process, so the allocator state of a failed probe never leaks into the next. A probe
passes when the step finishes; it fails on OOM, on a crash (e.g. the host's OOM killer, which CPU
offload can trigger) or on ``--probe-timeout``. Precision as bench_train's: fp32 parameters and AdamW
state, bf16 autocast on CUDA. ``--json`` is rewritten after every probe (``complete`` false until the
end), so a run stopped by a time limit keeps its probes.

Search: double from ``--start`` until a probe fails or ``--limit`` is reached, then bisect between
the last pass and the first fail down to ``--granule`` tokens.

Rows: by default one full-length document per row (``--long-share 1``), the worst case for time.
With varlen / flash-attention kernels, memory does not depend on where documents start, so
``--long-share 0`` (short documents: far cheaper attention) finds the same limit much faster; with
sdpa's dense block mask it does not (the mask grows as length^2).

Memory options (``OPTIONS``): activation checkpointing of every decoder layer; CPU offload of the
checkpointed layers' saved inputs (``torch.autograd.graph.save_on_cpu`` with pinned memory, through
transformers' ``activation_checkpointing_kwargs={"offload": True}``); our chunked cross-entropy vs
a fused linear cross-entropy (CUDA only: Liger's if liger-kernel is installed, else TRL's); the tiled MLP
(``--tiled-mlp-tokens``, 8192 on GPU: each MLP runs on 8K-token tiles recomputed in the backward, so a layer's
recomputation holds one tile's intermediate activations, not the whole row's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # after the path line above: the probe is bench_train's worker

TILE = "<tile>"  # replaced by --tiled-mlp-tokens
CHUNKED, FUSED = ["--loss", "chunked"], ["--loss", "auto"]  # fused: Liger's if installed, else TRL's kernel
OPTIONS = {
    "none": CHUNKED,
    "ckpt": ["--activation-checkpointing", *CHUNKED],
    "ckpt+offload": ["--activation-checkpointing", "--offload", *CHUNKED],
    "ckpt+fused-loss": ["--activation-checkpointing", *FUSED],
    "ckpt+offload+fused-loss": ["--activation-checkpointing", "--offload", *FUSED],
    "ckpt+offload+tiled-mlp": ["--activation-checkpointing", "--offload", "--tiled-mlp", TILE, *CHUNKED],
    "ckpt+offload+tiled-mlp+fused-loss": [
        "--activation-checkpointing", "--offload", "--tiled-mlp", TILE, *FUSED,
    ],
}
CUDA_ONLY = ("fused-loss",)

# CPU: 2 probes per option (well under a minute in all), tiles small enough to be used
CPU_DEFAULTS = {"shape": "tiny", "start": 1024, "limit": 2048, "granule": 512, "probe_timeout": 300,
                "tiled_mlp_tokens": 256}
GPU_DEFAULTS = {"shape": "llama-3.2-1b", "start": 8192, "limit": 1_048_576, "granule": 8192, "probe_timeout": 600,
                "tiled_mlp_tokens": 8192}


def longest_passing(probe, start: int, limit: int, granule: int) -> tuple[int, bool]:
    """Largest length (a multiple of `granule`, <= `limit`) for which `probe(length)` is True.

    Assumes passing is monotone in length. Returns (length, reached_limit); 0 if nothing passes.
    """
    passed, failed, length = 0, None, start
    while True:
        if not probe(length):
            failed = length
            break
        passed = length
        if length >= limit:
            return passed, True
        length = min(2 * length, limit)
    while failed - passed > granule:
        middle = (passed + failed) // 2 // granule * granule
        if middle <= passed:
            break
        if probe(middle):
            passed = middle
        else:
            failed = middle
    return passed, False


def probe_command(ns, option: str, length: int, out: str) -> list[str]:
    """bench_train.py's worker, one untimed-warm-up-free step of the prolong method at `length`."""
    argv = ["--worker", "prolong", "--worker-out", out, "--shape", ns.shape, "--lengths", str(length),
            "--attn", ns.attn, "--warmup", "0", "--steps", "1", "--long-share", str(ns.long_share),
            *(str(ns.tiled_mlp_tokens) if arg == TILE else arg for arg in OPTIONS[option])]
    if ns.layers:
        argv += ["--layers", str(ns.layers)]
    return bench_train.worker_command("prolong", bench_train.parse_args(argv), out)


def run_probe(ns, option: str, length: int) -> dict:
    """One step in a fresh process: {'length', 'status': ok | OOM | crashed | timeout, ...}."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if ns.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    limit_bytes = int(ns.cpu_memory_limit_gib * 2**30) if ns.cpu_memory_limit_gib else None

    def cap_address_space():  # CPU mode: make "device memory" finite so the search has a boundary
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "probe.json")
        try:
            completed = subprocess.run(
                probe_command(ns, option, length, out), env=env, timeout=ns.probe_timeout,
                preexec_fn=cap_address_space if limit_bytes else None,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
        except subprocess.TimeoutExpired:
            return {"length": length, "status": "timeout"}
        if completed.returncode != 0 or not os.path.exists(out):
            tail = completed.stderr.strip().splitlines()[-1:] or [""]
            return {"length": length, "status": "crashed", "returncode": completed.returncode, "error": tail[0][-300:]}
        report = json.loads(Path(out).read_text())
    result = report["results"][0]
    probe = {"length": length, "status": result["status"], "meta": report["meta"]}
    for key in ("peak_memory_gib", "step_s"):
        if key in result:
            probe[key] = result[key]
    return probe


def search_option(ns, option: str, on_probe=lambda row: None) -> dict:
    """`on_probe` gets the option's row so far after every probe (``longest`` None until the end)."""
    probes = []

    def probe(length: int) -> bool:
        result = run_probe(ns, option, length)
        probes.append(result)
        print(f"[{option}] {length}: {result['status']} "
              f"{result.get('peak_memory_gib', float('nan')):.2f} GiB", file=sys.stderr, flush=True)
        meta = next((p["meta"] for p in probes if "meta" in p), {})
        on_probe({"option": option, "longest": None, "reached_limit": None, "meta": meta,
                  "probes": [{k: v for k, v in p.items() if k != "meta"} for p in probes]})
        return result["status"] == "ok"

    if ns.check:
        ok = probe(ns.check)
        longest, reached_limit = (ns.check if ok else 0), ok
    else:
        longest, reached_limit = longest_passing(probe, ns.start, ns.limit, ns.granule)
    meta = next((p.pop("meta") for p in probes if "meta" in p), {})
    for p in probes:
        p.pop("meta", None)
    return {"option": option, "longest": longest, "reached_limit": reached_limit, "probes": probes, "meta": meta}


def markdown_table(rows: list[dict], ns) -> str:
    lines = ["| option | longest trainable length | peak mem at it (GiB) | step time at it (s) | probes |",
             "|---|---:|---:|---:|---|"]
    for row in rows:
        if row.get("skipped"):
            lines.append(f"| {row['option']} | skipped: {row['skipped']} | - | - | - |")
            continue
        at = next((p for p in row["probes"] if p["length"] == row["longest"] and p["status"] == "ok"), {})
        if ns.check:
            longest = f"{ns.check}: {'fits' if row['longest'] else 'does not fit'}"
        else:
            longest = f">= {row['longest']} (limit)" if row["reached_limit"] else str(row["longest"])
        trail = ", ".join(f"{p['length']}:{p['status']}" for p in row["probes"])
        peak = f"{at['peak_memory_gib']:.2f}" if "peak_memory_gib" in at else "-"
        step = f"{at['step_s']:.2f}" if "step_s" in at else "-"
        lines.append(f"| {row['option']} | {longest} | {peak} | {step} | {trail} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", help="benchmarks/shapes/<name>.json or a path to a config JSON")
    parser.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--attn", default="auto")
    parser.add_argument("--start", type=int, help="first length probed")
    parser.add_argument("--limit", type=int, help="longest length probed")
    parser.add_argument("--granule", type=int, help="resolution of the bisection (tokens)")
    parser.add_argument("--check", type=int, help="probe only this length per option (no search)")
    parser.add_argument("--long-share", type=float, default=1.0, help="share of one-document rows (see above)")
    parser.add_argument("--probe-timeout", type=int, help="seconds before a probe counts as failed")
    parser.add_argument("--tiled-mlp-tokens", type=int, help="tile size of the tiled-mlp options (GPU 8192, CPU 256)")
    parser.add_argument("--layers", type=int, help="the shape with this many decoder layers (default: all)")
    parser.add_argument("--cpu", action="store_true", help="CPU mode (automatic without CUDA)")
    parser.add_argument("--cpu-memory-limit-gib", type=float,
                        help="CPU mode: cap each probe's address space (RLIMIT_AS) to find a boundary")
    parser.add_argument("--json", help="write the results and every probe here")
    ns = parser.parse_args(argv)
    ns.cpu = ns.cpu or not bench_train.cuda_available()
    for key, value in (CPU_DEFAULTS if ns.cpu else GPU_DEFAULTS).items():
        if getattr(ns, key) is None:
            setattr(ns, key, value)
    return ns


def build_report(ns, started: str, rows: list[dict], complete: bool) -> dict:
    meta = dict(next((r["meta"] for r in rows if r.get("meta")), {}))
    meta.update(date=started, command="python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
                shape=ns.shape, layers=ns.layers, attn_requested=ns.attn, long_share=ns.long_share,
                cpu_memory_limit_gib=ns.cpu_memory_limit_gib, tiled_mlp_tokens=ns.tiled_mlp_tokens,
                probe_timeout=ns.probe_timeout, complete=complete)
    return {"meta": meta, "results": [{k: v for k, v in r.items() if k != "meta"} for r in rows]}


def main(argv=None) -> None:
    ns = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []

    def save(current: dict) -> None:  # after every probe: a run stopped by a time limit keeps its probes
        if ns.json:
            bench_train.write_json(ns.json, build_report(ns, started, rows + [current], complete=False))

    for option in ns.options:
        if ns.cpu and any(tag in option for tag in CUDA_ONLY):
            rows.append({"option": option, "skipped": "the fused loss needs CUDA"})
            continue
        rows.append(search_option(ns, option, on_probe=save))
    final = build_report(ns, started, rows, complete=True)
    meta = final["meta"]
    print(f"\n{meta.get('device')} | shape {ns.shape} | versions {meta.get('versions')} | "
          f"rows: long-document share {ns.long_share}\n")
    print(markdown_table(final["results"], ns))
    if ns.json:
        bench_train.write_json(ns.json, final)


if __name__ == "__main__":
    main()
