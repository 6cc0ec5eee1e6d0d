"""Stage-2 rows (`pack --mode long --length L --document_length D`): L/D documents of D tokens per row,
each its own span, train exactly like the D-token documents one by one (ProLong's 64K documents in
512K rows), here at L=256, D=64 on a tiny real Llama."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import random_documents, tiny_llama_config
from transformers import LlamaForCausalLM

from prolong.config import DataConfig
from prolong.data import pack_dataset, read_metadata
from prolong.errors import RecipeError
from prolong.parallel.batch import shard_batch_for_sequence_parallel
from prolong.training.mixture import check_packed_lengths
from prolong.training.collator import NOT_MODEL_INPUTS, PackedCollator
from prolong.training.mixture import MixtureDataset

L, D = 256, 64
VOCAB = 300


def tokenized(documents, domain="books"):
    return datasets.Dataset.from_dict({"input_ids": documents, "domain": [domain] * len(documents)})


@pytest.mark.parametrize("chunk_rows", [3, 4096])  # pieces carried across chunks, or one chunk
def test_rows_hold_whole_pieces_of_the_kept_documents_in_order(tmp_path, chunk_rows):
    docs = random_documents(30, VOCAB, 20, 200, seed=5)  # some shorter than D, some 2-3 pieces
    meta = pack_dataset(tokenized(docs), tmp_path / "out", mode="long", length=L, document_length=D,
                        chunk_rows=chunk_rows)
    rows = datasets.load_from_disk(str(tmp_path / "out")).to_list()
    pieces = [doc[i:i + D] for doc in docs if len(doc) >= D for i in range(0, len(doc) - D + 1, D)]
    whole = len(pieces) // (L // D) * (L // D)
    assert [row["input_ids"] for row in rows] == [sum(pieces[i:i + 4], []) for i in range(0, whole, 4)]
    assert all(row["indices"] == [[0, 64], [64, 128], [128, 192], [192, 256]] for row in rows)
    short = sum(len(doc) < D for doc in docs)
    assert short and meta["dropped_documents"] == short  # counted as min_length drops are
    assert meta["document_length"] == D and meta["length"] == L and meta["num_sequences"] == len(rows)
    assert meta["dropped_tokens"] == sum(map(len, docs)) - len(rows) * L
    assert read_metadata(tmp_path / "out")["document_length"] == D


def _model(attn):
    torch.manual_seed(0)
    config = tiny_llama_config(320)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def _loss_and_grads(model, **inputs):
    model.zero_grad()
    labels = inputs.pop("shift_labels")
    logits = model(**inputs, use_cache=False).logits[0]
    loss = F.cross_entropy(logits, labels[0], ignore_index=-100, reduction="sum")
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def stage2_row(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2") / "row"
    pack_dataset(tokenized(random_documents(6, VOCAB, D, 2 * D - 1, seed=7)), out, mode="long", length=L,
                 document_length=D)
    return datasets.load_from_disk(str(out))[0]


# flex_attention has no backward on CPU: its packed forward is in tests/test_packing_equivalence.py, and the
# CUDA kernels (varlen, flash) in tests/test_gpu.py; the row here is the same spans format they read
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_stage2_row_trains_exactly_like_its_documents_one_by_one(stage2_row, attn):
    model = _model(attn)
    batch = PackedCollator()([stage2_row])
    packed_loss, packed_grads = _loss_and_grads(
        model, shift_labels=batch["shift_labels"], **{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS})
    separate_loss, separate_grads = 0.0, None
    for start, end in stage2_row["indices"]:
        doc = torch.tensor(stage2_row["input_ids"][start:end])[None]
        labels = torch.cat([doc[:, 1:], torch.tensor([[-100]])], dim=1)
        loss, grads = _loss_and_grads(model, input_ids=doc, shift_labels=labels)
        separate_loss += loss
        separate_grads = grads if separate_grads is None else {k: separate_grads[k] + grads[k] for k in grads}
    assert len(stage2_row["indices"]) == L // D
    assert packed_loss == pytest.approx(separate_loss, rel=1e-5)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, separate_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("sp_size", [2, 4, 8])
def test_sequence_parallel_chunks_of_a_stage2_row_keep_its_documents(stage2_row, sp_size):
    # each rank's chunk carries the row's own positions and labels: documents restart where the row's do
    batch = PackedCollator()([stage2_row])
    chunks = [shard_batch_for_sequence_parallel(batch, rank, sp_size) for rank in range(sp_size)]
    for key in ("input_ids", "position_ids", "shift_labels"):
        assert torch.equal(torch.cat([c[key] for c in chunks], dim=-1), batch[key])
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [s for s, _ in stage2_row["indices"]]


def test_stage2_mixture_accepts_such_a_domain_at_max_length_L(tmp_path):
    # stage2.yaml's mixture at L: one-document rows, rows of D-token documents; the old way to get
    # D-token documents (pack --length D) is refused at max_length L, since it would train at D
    long_docs = random_documents(8, VOCAB, L, L + 50, seed=1)
    pack_dataset(tokenized(long_docs, "book-L"), tmp_path / "book-L", mode="long", length=L)
    pack_dataset(tokenized(long_docs, "book-D"), tmp_path / "book-D", mode="long", length=L, document_length=D)
    pack_dataset(tokenized(long_docs, "old"), tmp_path / "old", mode="long", length=D)
    mixture = {str(tmp_path / "book-L"): 0.5, str(tmp_path / "book-D"): 0.5}
    data = DataConfig(dataset_mixture=mixture, max_length=L)
    dataset = MixtureDataset(mixture, max_length=L, num_sequences=8)
    assert check_packed_lengths(dataset, data) == L
    assert {len(dataset[i]["indices"]) for i in range(8)} == {1, L // D}
    old = {str(tmp_path / "book-L"): 0.5, str(tmp_path / "old"): 0.5}
    with pytest.raises(RecipeError, match="cut at 64 tokens"):
        check_packed_lengths(MixtureDataset(old, max_length=L, num_sequences=8), DataConfig(dataset_mixture=old, max_length=L))


def test_no_usable_document_and_bad_lengths_are_refused_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--document_length 64: .* does not hold 4 document piece"):
        pack_dataset(tokenized(random_documents(5, VOCAB, 10, 63, seed=2)), tmp_path / "a", mode="long",
                     length=L, document_length=D)
    with pytest.raises(ValueError, match="--length 256 is not a multiple of --document_length 48"):
        pack_dataset(tokenized([[1] * 300]), tmp_path / "b", mode="long", length=L, document_length=48)
    with pytest.raises(ValueError, match="--document_length applies to --mode long only"):
        pack_dataset(tokenized([[1] * 300]), tmp_path / "c", mode="short", length=L, document_length=D)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
