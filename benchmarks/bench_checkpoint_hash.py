"""The cost of content digests per checkpoint (prolong/checkpoint): at save and at resume.

    python benchmarks/bench_checkpoint_hash.py --shapes tiny,1b --dir /tmp/bench-ckpt

Writes a checkpoint the way the Trainer lays it out (model.safetensors with fp32 master weights,
optimizer.pt with AdamW's two fp32 moments, scheduler/rng/trainer state) for each model shape, then times:

* save: writing those files (safetensors + torch.save), the cost a checkpoint already has;
* fsync: the sync pass the marker already waited for (``fsync_tree``);
* fsync+digest: the same pass with the digests read while the pages are still in memory, what a save
  now costs (the difference is the hashing cost);
* verify (cold): a resume's check of every file after the pages were dropped from the page cache
  (``posix_fadvise DONTNEED``), i.e. reading the checkpoint from disk once more.

Weights and moments are ``torch.empty`` (never touched: the 1B shape's 15 GB are written without using
15 GB of memory); the digest's cost does not depend on the values. The tiny shape is the tests' model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # LlamaConfig fields
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),  # Llama-3.2-1B
}


def write_checkpoint(path: Path, shape: dict) -> tuple[int, float]:
    """A Trainer-shaped checkpoint at ``path``; returns (bytes, seconds spent writing)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    shapes = {name: p.shape for name, p in model.named_parameters()}
    path.mkdir(parents=True)
    start = time.perf_counter()
    save_file({name: torch.empty(s) for name, s in shapes.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    state = {i: {"step": torch.tensor(1.0), "exp_avg": torch.empty(s), "exp_avg_sq": torch.empty(s)}
             for i, s in enumerate(shapes.values())}
    torch.save({"state": state, "param_groups": [{"lr": 1e-5, "params": list(state)}]}, path / "optimizer.pt")
    del state
    torch.save({"last_epoch": 1}, path / "scheduler.pt")
    torch.save({"python": 0, "numpy": 0, "cpu": torch.get_rng_state()}, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 1, "log_history": []}))
    (path / "config.json").write_text(model.config.to_json_string())
    seconds = time.perf_counter() - start
    return sum(f.stat().st_size for f in path.iterdir()), seconds


def drop_from_page_cache(path: Path) -> None:
    for f in path.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(name: str, root: Path, repeats: int) -> dict:
    from prolong.checkpoint import checkpoints
    from prolong.checkpoint.fsync import fsync_tree

    times = {"save": [], "fsync": [], "fsync+digest": [], "verify (cold)": []}
    for _ in range(repeats):
        path = root / f"{name}" / "checkpoint-1"
        shutil.rmtree(path.parent, ignore_errors=True)
        size, seconds = write_checkpoint(path, SHAPES[name])
        times["save"].append(seconds)
        start = time.perf_counter()
        fsync_tree(str(path))
        times["fsync"].append(time.perf_counter() - start)
        digests, start = {}, time.perf_counter()
        fsync_tree(str(path), digests)  # the pages are still cached, as right after a save
        times["fsync+digest"].append(time.perf_counter() - start)
        checkpoints.mark_complete(str(path), {"global_step": 1}, digests)
        drop_from_page_cache(path)
        checkpoints._VERIFIED.clear()
        start = time.perf_counter()
        checkpoints.verify_content(str(path))
        times["verify (cold)"].append(time.perf_counter() - start)
        shutil.rmtree(path.parent)
    best = {k: min(v) for k, v in times.items()}
    return {"shape": name, "bytes": size, **best,
            "digest cost at save": best["fsync+digest"] - best["fsync"],
            "digest GB/s (hot)": size / 1e9 / max(best["fsync+digest"] - best["fsync"], 1e-9),
            "verify GB/s (cold)": size / 1e9 / best["verify (cold)"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,1b", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--dir", default="/tmp/bench-checkpoint-hash", help="where checkpoints are written")
    parser.add_argument("--repeats", type=int, default=3, help="best of N (the 1B shape: 1)")
    args = parser.parse_args()
    root = Path(args.dir)
    for name in args.shapes.split(","):
        row = measure(name, root, args.repeats if name == "tiny" else 1)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
