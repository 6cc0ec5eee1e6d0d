"""A person can read the training log: the probe's verdict, the mixture summary, no config dumps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_cpt_log_states_probe_and_mixture_once_and_dumps_no_config(tiny_model_dir, packed_mixture, tmp_path):
    command = [sys.executable, "prolong/run_cpt.py", "--model_name_or_path", tiny_model_dir,
               "--dataset_mixture", json.dumps(packed_mixture), "--max_length", "128", "--max_steps", "1",
               "--per_device_train_batch_size", "2", "--use_cpu", "true", "--report_to", "none",
               "--save_strategy", "no", "--activation_checkpointing", "false", "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert log.count("Document-masking probe passed with attn_implementation=sdpa") == 1
    assert log.count("Data mixture: 2 sequences") == 1
    for path, share in packed_mixture.items():
        assert f"{share:.1%} of tokens  {path}:" in log
    # transformers' INFO dumps of the model and generation configs (one per load) are gone
    assert '"architectures"' not in log and "GenerationConfig {" not in log
