"""The training benchmarks run on CPU and report sane values (no timing assertions: the figures
themselves are for benchmarks/RESULTS.md, not for tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_train  # noqa: E402
import max_context  # noqa: E402


def test_bench_train_cpu_mode_reports_all_three_methods(tmp_path):
    out = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--cpu", "--lengths", "512",
         "--warmup", "1", "--steps", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == set(bench_train.METHODS)
    for method, row in rows.items():
        assert row["status"] == "ok", row
        assert row["length"] == 512 and row["tokens"] == 2 * 512  # two timed rows of 512 real tokens
        assert row["tokens_per_s"] > 0 and row["tflops_per_s"] > 0 and row["peak_memory_gib"] > 0
        assert f"| 512 | {method} | sdpa |" in completed.stdout
    # the hf-padded batch carries the same real tokens as the packed row, in padded form
    assert rows["prolong"]["documents_per_row"] == rows["hf-padded"]["documents_per_row"]
    meta = report["meta"]
    assert meta["device"].startswith("CPU") and meta["versions"]["transformers"] and meta["date"]
    assert "bench_train.py --cpu" in meta["command"] and "sum(doc_len^2)" in meta["flops_formula"]


def test_training_flops_formula_by_hand():
    # 6 * N * T + 6 * layers * d_attn * sum(n^2): N=100, T=3+5, 2 layers, d_attn=8
    assert bench_train.training_flops(100, 2, 8, [3, 5]) == 6 * 100 * 8 + 6 * 2 * 8 * (9 + 25)


@pytest.mark.parametrize("tied", [False, True])
def test_matmul_parameters_excludes_the_input_embedding_only(tied):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(320, tie_word_embeddings=tied))
    blocks = sum(p.numel() for p in model.model.layers.parameters()) + model.model.norm.weight.numel()
    assert bench_train.matmul_parameters(model) == blocks + 320 * 64  # the lm_head is a matmul, tied or not


def test_rows_fill_the_length_exactly_with_the_long_share():
    kinds = bench_train.row_kinds(num_warmup=2, num_steps=5, long_share=0.6)
    assert kinds[:2] == [True, False] and sum(kinds[2:]) == 3
    rows = bench_train.make_rows(4096, kinds, vocab_size=500, seed=0)
    assert all(sum(map(len, docs)) == 4096 for docs in rows)
    for docs, is_long in zip(rows, kinds):
        assert (len(docs) == 1) if is_long else (len(docs) > 1 and min(map(len, docs)) >= 1)
    again = bench_train.make_rows(4096, kinds, vocab_size=500, seed=0)
    assert all((a == b).all() for r1, r2 in zip(rows, again) for a, b in zip(r1, r2))


def test_bisection_finds_the_boundary_and_the_limit():
    probed = []

    def fits_below(boundary):
        def probe(length):
            probed.append(length)
            return length <= boundary
        return probe

    assert max_context.longest_passing(fits_below(45_000), 8192, 1 << 20, 8192) == (40960, False)
    assert probed[:4] == [8192, 16384, 32768, 65536]  # doubling, then bisection
    assert max_context.longest_passing(fits_below(10**9), 8192, 100_000, 8192) == (100_000, True)
    assert max_context.longest_passing(fits_below(0), 8192, 1 << 20, 8192) == (0, False)


def test_markdown_table_marks_oom():
    table = bench_train.markdown_table([{"method": "hf-padded", "length": 65536, "status": "OOM", "attn": "sdpa"}])
    assert "| 65536 | hf-padded | sdpa | - | - | - | OOM |" in table


def _compare(tmp_path, base: dict, new: dict, capsys):
    import compare_runs

    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "new.json").write_text(json.dumps(new))
    status = compare_runs.main([str(tmp_path / "base.json"), str(tmp_path / "new.json")])
    return status, capsys.readouterr()


def test_compare_runs_flags_a_peak_memory_regression(tmp_path, capsys):
    base = json.loads((ROOT / "benchmarks" / "results" / "cpu-tiny.json").read_text())
    status, out = _compare(tmp_path, base, base, capsys)
    assert status == 0 and "| 2048 | prolong |" in out.out and "+0.0%" in out.out

    grown = json.loads(json.dumps(base))
    row = next(r for r in grown["results"] if r["method"] == "prolong" and r["length"] == 2048)
    row["peak_memory_gib"] *= 1.10
    status, out = _compare(tmp_path, base, grown, capsys)
    assert status == 1 and "prolong at 2048: peak memory" in out.out and "+10.0%" in out.out

    oom = json.loads(json.dumps(base))
    next(r for r in oom["results"] if r["method"] == "trl-padding-free" and r["length"] == 512)["status"] = "OOM"
    status, out = _compare(tmp_path, base, oom, capsys)
    assert status == 1 and "trl-padding-free at 512: OOM (baseline ran)" in out.out


def test_compare_runs_refuses_runs_with_different_memory_options(tmp_path, capsys):
    plain = json.loads((ROOT / "benchmarks" / "results" / "cpu-tiny.json").read_text())
    checkpointed = json.loads((ROOT / "benchmarks" / "results" / "cpu-tiny-ckpt.json").read_text())
    status, out = _compare(tmp_path, plain, checkpointed, capsys)
    assert status == 2 and "activation_checkpointing: False vs True" in out.err
