"""Sequence parallelism, DDP and FSDP2 against a single process, on CPU with torchrun + gloo.

One ``torchrun --nproc_per_node 2`` launch runs every case of tests/distributed/parallel_worker.py
(starting Python + transformers twice costs more than the cases); each test checks one case.
fp32 everywhere: differences are summation-order noise (~1e-7), a wrong mask is ~1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import launch

pytestmark = pytest.mark.slow  # every test reads one torchrun run (make test-fast skips them)

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed" / "parallel_worker.py"
TOLERANCE = 1e-5


def run_torchrun(script: Path, out_dir: Path, nproc: int = 2) -> dict:
    launch(script, out_dir, processes=nproc, timeout=300)
    return json.loads((out_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_torchrun(WORKER, tmp_path_factory.mktemp("parallel"))


def case(results: dict, name: str) -> dict:
    result = results[name]
    assert "error" not in result, result["error"]
    return result


SEQUENCE_PARALLEL_CASES = [
    "sp_crossing_document",  # (a) a document crosses the chunk boundary
    "sp_documents_inside_chunks",  # (b) every document fits inside one chunk
    "sp_padded_odd_length",  # row padded to a multiple of sp_size with a dummy document
    "sp_gqa_kv_less_than_sp",  # 1 K/V head, sp 2: replicated
    "sp_gqa_kv_more_than_sp",  # 4 K/V heads, sp 2: split
    "sp_eager_inner",
    "sp_many_short_documents",  # one-token documents, several restarts per chunk
    "sp_qwen3",  # q_norm/k_norm before RoPE, per chunk
    "sp_gradient_checkpointing",  # recomputation reuses the per-forward global positions
    "sp_fsdp2",  # Ulysses inside fully_shard instead of DDP
    "sp_fsdp2_tiled_mlp_checkpointing",  # tiled MLP's recomputation inside FSDP2 and checkpointing
]


@pytest.mark.parametrize("name", SEQUENCE_PARALLEL_CASES)
def test_sequence_parallel_matches_single_process(results, name):
    result = case(results, name)
    assert result["token_count_matches"] == 1  # per-chunk counts add up to the row's count
    assert result["loss_diff"] < TOLERANCE
    assert result["grad_diff"] < TOLERANCE * result["grad_scale"], result  # every parameter
    assert result["position_gathers"] == 1  # global positions gathered once per forward


def test_cut_documents_would_be_detected(results):
    """Control: a reference that cuts the crossing document at the chunk boundary does not match."""
    result = case(results, "control_cut_document_differs")
    assert result["grad_diff"] > 100 * TOLERANCE * result["grad_scale"]


@pytest.mark.parametrize(
    "name",
    [
        "ddp_vs_single_process",
        "fsdp2_vs_single_process",
        "ddp_tiled_mlp_vs_single_process",  # tiled MLP's parameter gradients go through DDP's reducer
        "fsdp2_tiled_mlp_vs_single_process",
    ],
)
def test_data_parallel_matches_single_process(results, name):
    """2 ranks x 1 micro-batch == 1 process x 2 accumulated micro-batches (same global batch),
    gradients and parameters after one AdamW step; FSDP2 therefore also equals DDP."""
    result = case(results, name)
    assert result["loss_diff"] < TOLERANCE
    assert result["grad_diff"] < 1e-6
    # AdamW's first step is about lr * sign(grad): for near-zero gradients the summation-order
    # noise of the tiles' parameter gradients shows up amplified (a wrong gradient moves ~lr = 1e-2)
    assert result["param_diff_after_step"] < (1e-4 if "tiled" in name else 1e-6)
