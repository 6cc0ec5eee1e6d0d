"""The training benchmarks run on CPU and report sane values (no timing assertions: the figures
themselves are for benchmarks/RESULTS.md, not for tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_train  # noqa: E402
import max_context  # noqa: E402


GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def _gpu_check_plan() -> tuple[dict, str]:
    """`gpu_check.sh --plan`: {step: (cap seconds, command)} and its stderr."""
    completed = subprocess.run(["bash", str(GPU_CHECK), "--plan"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    plan = {}
    for line in completed.stderr.splitlines():
        if "] PLAN " in line and " (cap " in line:
            name, rest = line.split("] PLAN ", 1)[1].split(" (cap ", 1)
            cap, command = rest.split("s): ", 1)
            plan[name] = (int(cap), command)
    return plan, completed.stderr


def test_gpu_check_plans_every_gpu_step_with_arguments_the_benchmarks_accept(monkeypatch):
    """`gpu_check.sh --plan` prints the GPU run's steps without running them; each benchmark command is
    parsed by the benchmark's own argument parser (as on the GPU machine, where CUDA is there).
    The whole CPU dry run (`bash benchmarks/gpu_check.sh --dry-run`, ~2-4 min) is a manual check; the
    suite runs one of its steps (below) and the benchmarks' code in process."""
    import shlex

    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    plan, _ = _gpu_check_plan()
    assert list(plan) == ["setup", "device", "test_gpu", "bench_1b", "max_context_1b_512k", "max_context_8b_131072",
                          "max_context_8b_262144"]
    # the image's own pytest plugins (xdist, benchmark, cov, ...) stay out of the GPU tests
    assert plan["test_gpu"][1].startswith("env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 ")
    assert "tests/test_gpu.py" in plan["test_gpu"][1]
    monkeypatch.setattr(bench_train, "cuda_available", lambda: True)  # the GPU machine's defaults
    bench_argv = shlex.split(plan["bench_1b"][1])
    assert bench_argv[1] == "benchmarks/bench_train.py"
    bench = bench_train.parse_args(bench_argv[2:])
    assert (bench.shape, bench.lengths, bench.methods) == ("llama-3.2-1b", [16384, 65536], ["prolong", "trl-padding-free"])
    assert bench.activation_checkpointing and not bench.cpu and bench.repeats >= 2  # the same options for both
    assert bench.json.startswith("benchmarks/results/")
    for name, shape, layers, length in [("max_context_1b_512k", "llama-3.2-1b", None, 524288),
                                        ("max_context_8b_131072", "llama-3-8b", 4, 131072),
                                        ("max_context_8b_262144", "llama-3-8b", 4, 262144)]:
        cap, command = plan[name]
        argv = shlex.split(command)
        assert argv[1] == "benchmarks/max_context.py"
        check = max_context.parse_args(argv[2:])
        assert (check.shape, check.layers, check.check) == (shape, layers, length)
        assert check.options == ["ckpt+offload+tiled-mlp"]
        assert check.tiled_mlp_tokens == 8192 and not check.cpu, name
        # the probe's own timeout fires well before the step's: the parent then still writes its JSON
        assert cap - check.probe_timeout >= 15, name
        assert check.json.startswith("benchmarks/results/")
    for shape in ("llama-3.2-1b", "llama-3-8b"):
        assert Path(bench_train.shape_path(shape)).is_file()
    assert subprocess.run(["git", "status", "--porcelain", "benchmarks/results"], cwd=ROOT, capture_output=True,
                          text=True).stdout == ""  # --plan wrote nothing


def test_gpu_check_caps_fit_one_device_call_with_margin():
    """One device call is at most 9 minutes (540 s) with set-up; the steps' caps, each with its kill
    grace, add up to at most TOTAL_S minus a margin, and TOTAL_S leaves a minute of the call for the
    rest (the script's own start, copying the results). The sum was 810 s against 480 s."""
    plan, stderr = _gpu_check_plan()
    total_s = int(stderr.split("TOTAL_S=", 1)[1].split("s", 1)[0])
    kill_s = int(stderr.split("caps + ", 1)[1].split("s kill grace", 1)[0])
    planned = sum(cap + kill_s for cap, _ in plan.values())
    assert f"PLAN total: {planned}s of TOTAL_S={total_s}s" in stderr
    assert "setup" in plan and total_s <= 540 - 60 and planned <= total_s - 20, (planned, total_s)


@pytest.mark.slow
def test_gpu_check_dry_run_runs_a_step_end_to_end(tmp_path):
    """One step of the CPU dry run through the script (ONLY selects it): the step runs under its
    timeout, is logged OK, and its JSON carries the device line; the other steps do not run."""
    completed = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], capture_output=True, text=True, timeout=600,
                               env={**os.environ, "RESULTS_DIR": str(tmp_path), "PYTHON": sys.executable,
                                    "ONLY": "max_context_8b_128"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "OK max_context_8b_128" in completed.stderr and "START bench_1b" not in completed.stderr
    assert "torch" in next(tmp_path.glob("dry-device-*.txt")).read_text()
    (path,) = tmp_path.glob("dry-*check*.json")
    check = json.loads(path.read_text())
    assert check["meta"]["device"].startswith("CPU") and check["results"][0]["longest"] == 128
    assert check["meta"]["checkpointing_on"]  # ckpt+offload+tiled-mlp: really on in the probe
    assert check["meta"]["complete"] and check["meta"]["num_hidden_layers"] == check["meta"]["layers"] == 1
    assert check["meta"]["dtype"] == "float32"  # fp32 master weights


@pytest.mark.slow
def test_bench_train_interleaves_the_methods_and_reports_medians(monkeypatch, capsys):
    """run_all runs the methods A B A B (each run is the real worker, here in this process instead of
    a fresh one) and summarises each (method, length) by its median over the repeats."""
    monkeypatch.setattr(bench_train, "run_method_in_subprocess", bench_train.run_worker)
    ns = bench_train.parse_args(["--cpu", "--shape", "tiny", "--lengths", "128", "--methods", "prolong", "hf-padded",
                                 "--activation-checkpointing", "--warmup", "0", "--steps", "1", "--repeats", "2"])
    report = bench_train.run_all(ns)
    order = [line.split(": ")[1] for line in capsys.readouterr().err.splitlines() if line.startswith("repeat ")]
    assert order == ["prolong", "hf-padded"] * 2  # A B A B, not A A B B
    assert report["meta"]["order"] == "interleaved: prolong hf-padded per repeat"
    rows = {(r["method"], r["length"]): r for r in report["results"]}
    assert set(rows) == {("prolong", 128), ("hf-padded", 128)}
    for row in rows.values():
        assert row["status"] == "ok" and row["tokens"] == 128, row  # one timed row of 128 real tokens
        assert row["repeats"] == 2 and len(row["tokens_per_s_runs"]) == 2
        assert row["tokens_per_s"] == pytest.approx(sum(row["tokens_per_s_runs"]) / 2)  # median of two
        assert row["tflops_per_s"] > 0 and row["peak_memory_gib"] > 0
    meta = report["meta"]
    assert meta["activation_checkpointing"] and meta["checkpointing_on"] and meta["prolong_loss_kernel"] == "chunked"
    assert meta["device"].startswith("CPU") and meta["versions"]["transformers"] and meta["date"]
    assert "sum(doc_len^2)" in meta["flops_formula"]


def test_bench_train_writes_its_json_after_every_run(tmp_path, monkeypatch):
    """A step stopped by its time limit keeps the runs it finished: the JSON is rewritten after each
    worker (it was written once, at the end, so a timeout lost every repeat)."""
    out = tmp_path / "bench.json"
    seen = []

    def worker(method, ns):  # what the file holds when the next worker starts
        seen.append(json.loads(out.read_text())["meta"]["runs_done"] if out.exists() else None)
        return {"meta": {"device": "CPU", "loss_kernel": "chunked"},
                "results": [{"method": method, "length": 64, "status": "ok", "tokens_per_s": 1.0}]}

    monkeypatch.setattr(bench_train, "run_method_in_subprocess", worker)
    ns = bench_train.parse_args(["--cpu", "--shape", "tiny", "--lengths", "64", "--methods", "prolong", "hf-padded",
                                 "--repeats", "2", "--json", str(out)])
    bench_train.run_all(ns)
    assert seen == [None, 1, 2, 3]
    final = json.loads(out.read_text())
    assert (final["meta"]["runs_done"], final["meta"]["runs_planned"]) == (4, 4)
    assert [r["repeats"] for r in final["results"]] == [2, 2]


def test_max_context_writes_its_json_after_every_probe(tmp_path, monkeypatch):
    out = tmp_path / "check.json"
    seen = []

    def probe(ns, option, length):
        seen.append([p["length"] for r in json.loads(out.read_text())["results"] for p in r["probes"]]
                    if out.exists() else None)
        return {"length": length, "status": "ok" if length <= 2048 else "OOM", "meta": {"device": "CPU"}}

    monkeypatch.setattr(max_context, "run_probe", probe)
    max_context.main(["--cpu", "--options", "ckpt", "--start", "1024", "--limit", "4096", "--granule", "1024",
                      "--json", str(out)])
    assert seen == [None, [1024], [1024, 2048], [1024, 2048, 4096]]  # 3072 probed after 4096 failed
    final = json.loads(out.read_text())
    assert final["meta"]["complete"] and final["results"][0]["longest"] == 2048
    assert [p["length"] for p in final["results"][0]["probes"]] == [1024, 2048, 4096, 3072]


def test_benchmark_models_hold_fp32_master_weights_and_autocast_on_cuda(monkeypatch):
    """What `bf16: true` trains with: fp32 parameters (and so fp32 AdamW state) under bf16 autocast.
    The benchmarks loaded bf16 weights on CUDA, so AdamW stepped bf16 master weights. Checked without a
    GPU: the model factory is intercepted before it allocates anything."""
    import torch
    import transformers

    calls = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config",
                        lambda config, **kwargs: calls.append((config, kwargs)))
    bench_train.build_model("llama-3-8b", 131072, "sdpa", "cuda", layers=4)
    config, kwargs = calls[0]
    assert kwargs["dtype"] == torch.float32 and config.num_hidden_layers == 4 and config.hidden_size == 4096
    ns = bench_train.parse_args(["--worker", "prolong", "--worker-out", "x", "--shape", "tiny", "--lengths", "64"])
    assert bench_train.trainer_arguments(ns, cuda=True)["bf16"]  # autocast on CUDA


@pytest.mark.parametrize(
    "method,checkpointing",
    [("prolong", True), ("trl-padding-free", True), ("hf-padded", True), ("trl-padding-free", False)],
)
def test_the_benchmark_step_checkpoints_exactly_when_asked(method, checkpointing):
    """transformers turns checkpointing on inside train() (docs/versions.md): a trainer fresh from __init__ never
    recomputed anything, whatever its arguments said. Counted here: a checkpointed decoder layer
    runs its forward twice per step (forward + recomputation in the backward). TRL's SFTConfig
    defaults to checkpointing, so "off" must be off for it too."""
    argv = ["--worker", method, "--worker-out", "unused", "--shape", "tiny", "--lengths", "128",
            "--warmup", "0", "--steps", "1"] + (["--activation-checkpointing"] if checkpointing else [])
    ns = bench_train.parse_args(argv)
    trainer, _ = bench_train.prepare_method(method, ns)
    layer = trainer.accelerator.unwrap_model(trainer.model).model.layers[0]
    calls = []
    # a pre-hook of the layer's first op: transformers checkpoints the layer's forward (the layer's own
    # hooks run once), and the recomputation stops early once it has what the backward needs
    layer.input_layernorm.register_forward_pre_hook(lambda module, args: calls.append(1))
    docs = bench_train.make_rows(128, [False], trainer.model.config.vocab_size, seed=0)[0]
    bench_train.train_step(trainer, bench_train.make_batch(method, trainer, docs))
    assert len(calls) == (2 if checkpointing else 1)


def test_repeats_are_summarised_by_their_median_and_a_failed_repeat_fails_the_row():
    runs = [{"method": "prolong", "length": 8, "status": "ok", "tokens_per_s": v, "peak_memory_gib": 1.0}
            for v in (10.0, 30.0, 20.0)]
    row = bench_train.median_over_repeats(runs)
    assert row["tokens_per_s"] == 20.0 and row["tokens_per_s_runs"] == [10.0, 30.0, 20.0] and row["repeats"] == 3
    assert "| 8 | prolong | - | 20 | 10-30 |" in bench_train.markdown_table([row])
    failed = bench_train.median_over_repeats(runs[:2] + [{"method": "prolong", "length": 8, "status": "OOM"}])
    assert failed["status"] == "OOM" and failed["statuses"] == ["ok", "ok", "OOM"]


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
    assert "| 65536 | hf-padded | sdpa | - | - | - | - | - | OOM |" in table


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


@pytest.mark.slow
def test_gpu_check_set_up_uses_the_machines_python_with_its_torch(tmp_path):
    """The lent GPU machines' python3 is itself a venv's (/opt/torch/.venv): a venv made from it with
    --system-site-packages does not see its CUDA torch, so every step failed. The set-up adds the
    carried wheels with --target to that python3's path, then imports every module the run imports.
    Here: a venv python, no wheels, no CUDA, and a stand-in for liger-kernel (carried on the GPU
    machine, not installed for CPU CI); the set-up must get as far as the CUDA check.
    tests/test_gpu_install.py does the same over an emulation of the lent image."""
    liger = tmp_path / "site" / "liger_kernel"
    liger.mkdir(parents=True)
    (liger / "__init__.py").write_text("")
    (liger / "transformers.py").write_text("LigerFusedLinearCrossEntropyLoss = None\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    completed = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, timeout=900,
                               env={**os.environ, "ONLY": "setup", "GPU_PYTHON": sys.executable,
                                    "GPU_SITE": str(tmp_path / "site"), "WHEELS_DIR": str(wheels),
                                    "RESULTS_DIR": str(tmp_path / "results"), "CAP_SCALE": "10"})
    log = next((tmp_path / "results").glob("gpu-check-*.log")).read_text()
    assert completed.returncode == 1 and "FAILED setup" in completed.stderr, completed.stderr
    assert "AssertionError: no CUDA" in log and "No module named" not in log, log[-2000:]
    assert "modules; torch" in log  # the import check ran to its end
