"""prolong-plan (prolong/plan.py): the CLI, a bad input, the calibration against the real step on the
CPU, and the plan's shape: more FSDP2 GPUs hold less each, offload moves memory to the host, and the
three-layer trace equals the trace of every layer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prolong.plan import Options, load_model_config, measured_peaks, run_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = os.path.join(os.path.dirname(sys.executable), "prolong-plan")


def _plan(shape="llama-3.2-1b", gpu_memory_gib=80.0, **options):
    options = {"max_length": 8192, "checkpointing": True, "fsdp": True, "gpus": 8, **options}
    return run_plan(load_model_config(shape), Options(**options), gpu_memory_gib)


@pytest.mark.slow
def test_cli_plans_the_8b_recipe_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    result = subprocess.run([PLAN, "recipes/prolong-8b/stage1.yaml", "--max_length", "16384", "--gpus", "8",
                             "--gpu-memory-gib", "80", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "accelerate_configs/fsdp2.yaml" in result.stdout and "fits" in result.stdout
    report = json.loads(out.read_text())
    assert report["fits"] is True and 5 < report["peak_gib"] < 40
    assert report["options"]["fsdp"] and report["options"]["max_length"] == 16384 and report["options"]["gpus"] == 8
    for key in ("parameters_gib", "gradients_gib", "optimizer_gib", "activations_gib", "step_peak_gib",
                "optimizer_peak_gib", "host_gib"):
        assert report[key] >= 0, key


@pytest.mark.slow
def test_bad_input_is_one_message_exit_2():
    result = subprocess.run([PLAN, "recipes/prolong-8b/stage1.yaml", "--max_lenght", "8192"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == ("prolong-plan: error: Unknown key 'max_lenght' in the command line. "
                                     "Did you mean 'max_length'?")


# Each case: the plan of the step as it runs on the CPU against the same step of the real CPTTrainer,
# measured by torch's MemTracker. The committed table (more cases, longer rows, a 30-layer shape):
# benchmarks/results/plan-calibration.md, from `prolong-plan --calibrate`.
@pytest.mark.slow
@pytest.mark.parametrize("shape, checkpointing, tiles", [("tiny", False, 0), ("cpu-wide-mlp", True, 256)])
def test_calibration_within_ten_percent(shape, checkpointing, tiles):
    lengths = (512, 2048)
    measured = measured_peaks(shape, lengths, checkpointing, tiles)
    for length, peak in zip(lengths, measured):
        plan = run_plan(load_model_config(shape), Options(
            max_length=length, checkpointing=checkpointing, tiled_mlp_tokens=tiles, attn="sdpa",
            loss_kernel="chunked", bf16=False, device="cpu"), gpu_memory_gib=1e9)
        assert abs(plan.peak_gib / peak - 1) < 0.10, (shape, length, plan.peak_gib, peak)


def test_committed_calibration_is_within_ten_percent():
    with open(os.path.join(ROOT, "benchmarks", "results", "plan-calibration.json")) as f:
        rows = json.load(f)["rows"]
    assert {"tiny", "cpu-wide-mlp"} <= {r["shape"] for r in rows}
    assert all(abs(r["planned_gib"] / r["measured_gib"] - 1) < 0.10 for r in rows), rows


def test_more_fsdp2_gpus_hold_less_each():
    peaks = [_plan(gpus=gpus).peak_gib for gpus in (1, 2, 8)]
    assert peaks[0] > peaks[1] > peaks[2], peaks
    ddp = _plan(gpus=2, fsdp=False)
    assert ddp.peak_gib > peaks[1]  # DDP replicates what FSDP2 shards


def test_offload_moves_memory_to_the_host():
    plain = _plan(gpus=1)
    activations = _plan(gpus=1, activation_offload=True)
    weights = _plan(gpus=1, fsdp_offload=True)
    assert activations.step_peak_gib < plain.step_peak_gib and activations.host_gib > plain.host_gib
    assert activations.activations_gib < plain.activations_gib / 2
    assert weights.peak_gib < plain.peak_gib and weights.host_gib > plain.host_gib + weights.parameters_gib
    assert weights.parameters_gib == weights.optimizer_gib == 0


@pytest.mark.parametrize("options", [
    {"fsdp": False, "gpus": 1, "checkpointing": False},
    {"activation_offload": True, "tiled_mlp_tokens": 2048, "liger": True, "loss_kernel": "liger"},
    {"sequence_parallel": 2, "gpus": 2, "loss_kernel": "trl"},
], ids=["no checkpointing", "offload + tiles + Liger", "SP 2"])
def test_three_traced_layers_stand_for_all(options):
    config = load_model_config("llama-3.2-1b")  # 16 layers
    opts = Options(**{"max_length": 4096, "checkpointing": True, "fsdp": True, "gpus": 8, **options})
    short, full = run_plan(config, opts), run_plan(config, opts, trace_all_layers=True)
    for key in ("step_peak_gib", "activations_gib", "host_gib", "optimizer_peak_gib"):
        assert getattr(short, key) == pytest.approx(getattr(full, key), rel=0.01, abs=1e-3), key
