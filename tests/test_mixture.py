"""The train-time mixture: token shares, determinism, and exact resumption."""

from __future__ import annotations

import collections

import pytest
from accelerate import skip_first_batches
from conftest import random_documents, write_packed_dataset
from torch.utils.data import DataLoader, SequentialSampler

from prolong.training.collator import PackedCollator
from prolong.config import RecipeError
from prolong.training.mixture import BalancedOrder, MixtureDataset, check_packed_lengths


@pytest.fixture(scope="module")
def three_domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    return {
        write_packed_dataset(str(root / "a"), random_documents(30, 300, 50, 300, 1), 64, "a"): 0.6,
        write_packed_dataset(str(root / "b"), random_documents(30, 300, 5, 60, 2), 64, "b"): 0.3,
        write_packed_dataset(str(root / "c"), random_documents(30, 300, 5, 20, 3), 64, "c"): 0.1,
    }


def test_shares_within_two_points_over_1000_sequences(three_domains):
    dataset = MixtureDataset(three_domains, 64, num_sequences=3000, seed=7)
    for offset in (0, 1234):  # any window of 1,000 consecutive sequences
        counts = collections.Counter(dataset[i]["domain"] for i in range(offset, offset + 1000))
        for path, share in three_domains.items():
            domain = path.rsplit("/", 1)[-1]
            assert abs(counts[domain] / 1000 - share) <= 0.02, (domain, counts)


def test_same_seed_same_sequences_and_other_seed_differs(three_domains):
    first = MixtureDataset(three_domains, 64, num_sequences=200, seed=1)
    second = MixtureDataset(three_domains, 64, num_sequences=200, seed=1)
    other = MixtureDataset(three_domains, 64, num_sequences=200, seed=2)
    assert [first[i]["input_ids"].tolist() for i in range(200)] == [second[i]["input_ids"].tolist() for i in range(200)]
    assert [first[i]["input_ids"].tolist() for i in range(200)] != [other[i]["input_ids"].tolist() for i in range(200)]


def test_every_row_of_a_domain_is_used_once_per_pass(three_domains):
    path = next(iter(three_domains))
    dataset = MixtureDataset({path: 1.0}, 64, num_sequences=10_000, seed=3)
    n = len(dataset.datasets[0])
    rows = [dataset.locate(i)[1] for i in range(2 * n)]
    assert sorted(rows[:n]) == list(range(n)) and sorted(rows[n:]) == list(range(n))


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_dataloader_yields_exactly_what_the_uninterrupted_one_yields_next(three_domains, workers):
    dataset = MixtureDataset(three_domains, 64, num_sequences=40, seed=11)

    def loader():
        return DataLoader(dataset, batch_size=2, sampler=SequentialSampler(dataset), collate_fn=PackedCollator(),
                          num_workers=workers)

    uninterrupted = [batch["input_ids"].tolist() for batch in loader()]
    k = 7  # stopped after k steps; the Trainer restores with accelerate's skip_first_batches
    resumed = [batch["input_ids"].tolist() for batch in skip_first_batches(loader(), k)]
    assert resumed == uninterrupted[k:]


def test_sequences_longer_than_max_length_are_split(three_domains):
    path = next(iter(three_domains))
    dataset = MixtureDataset({path: 1.0}, 16, num_sequences=100, seed=0)
    for i in range(20):
        example = dataset[i]
        assert len(example["input_ids"]) == 16
        spans = example["indices"]
        assert spans[0][0] == 0 and spans[-1][1] == 16
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_balanced_order_keeps_the_items_and_evens_the_attention_work(three_domains):
    dataset = MixtureDataset(three_domains, 64, num_sequences=64, seed=5)
    balanced = BalancedOrder(dataset, micro_batch=1, num_processes=4, accumulation=4)
    block = [balanced[i]["input_ids"] for i in range(16)]
    assert sorted(map(tuple, block)) == sorted(tuple(dataset[i]["input_ids"]) for i in range(16))

    def per_process_cost(items):
        costs = [0] * 4
        for position, example in enumerate(items):
            costs[position % 4] += sum((e - s) ** 2 for s, e in example["indices"])
        return max(costs) - min(costs)

    plain_spread = per_process_cost([dataset[i] for i in range(16)])
    balanced_spread = per_process_cost([balanced[i] for i in range(16)])
    assert balanced_spread <= plain_spread


def test_bad_mixtures_are_refused(three_domains, tmp_path):
    with pytest.raises(RecipeError, match="sum to 1"):
        MixtureDataset({p: 0.5 for p in three_domains}, 64, 10)
    with pytest.raises(RecipeError, match="does not exist"):
        MixtureDataset({str(tmp_path / "nope"): 1.0}, 64, 10)
    empty = tmp_path / "empty"
    write_packed_dataset(str(empty), [], 64, "empty")
    with pytest.raises(RecipeError, match="no sequences"):
        MixtureDataset({str(empty): 1.0}, 64, 10)


def _rows_dataset(path, lengths, nominal_length):
    """A packed domain whose rows have the given token counts (sft bins can be shorter than the
    nominal `length` the metadata records)."""
    import json
    import os

    from datasets import Dataset

    rows = [{"input_ids": list(range(n)), "indices": [[0, n]], "domain": os.path.basename(path)} for n in lengths]
    Dataset.from_list(rows).save_to_disk(path)
    if nominal_length is not None:  # None: a dataset not written by prolong-data (no metadata)
        with open(os.path.join(path, "prolong_data.json"), "w") as f:
            json.dump({"length": nominal_length}, f)
    return path


def test_split_rows_shorter_than_the_nominal_length_give_no_empty_pieces(tmp_path):
    path = _rows_dataset(str(tmp_path / "sft"), [1000, 300, 1000, 50], nominal_length=1000)
    dataset = MixtureDataset({path: 1.0}, max_length=400, num_sequences=8, seed=0, block_size=8)
    items = [dataset[i] for i in range(8)]  # one pass: 3 + 1 + 3 + 1 pieces
    assert sorted(len(x["input_ids"]) for x in items) == sorted([400, 400, 200, 300, 400, 400, 200, 50])
    PackedCollator()(items)  # every piece is a valid packed example


def test_token_shares_hold_when_pieces_are_uneven(tmp_path):
    """640-token rows cut at 480 give pieces of 480 and 160 tokens: shares must count real tokens."""
    a = _rows_dataset(str(tmp_path / "a"), [640] * 20, nominal_length=640)
    b = _rows_dataset(str(tmp_path / "b"), [480] * 20, nominal_length=480)
    dataset = MixtureDataset({a: 0.5, b: 0.5}, max_length=480, num_sequences=1000, seed=0)
    tokens = collections.Counter()
    for i in range(1000):
        example = dataset[i]
        tokens[example["domain"]] += len(example["input_ids"])
    assert tokens["a"] / sum(tokens.values()) == pytest.approx(0.5, abs=0.02)


def test_a_domain_without_metadata_is_packed_at_its_longest_row(tmp_path):
    """No prolong-data metadata: the packed length is the longest row, not the first, so the longer
    rows are split (no tail dropped) and the length check sees the same length as the split."""
    from prolong.config import DataConfig

    path = _rows_dataset(str(tmp_path / "plain"), [300, 1000], nominal_length=None)
    dataset = MixtureDataset({path: 1.0}, max_length=400, num_sequences=4, seed=0, block_size=4)
    assert sorted(len(dataset[i]["input_ids"]) for i in range(4)) == [200, 300, 400, 400]  # one pass: 1 + 3 pieces
    assert check_packed_lengths(dataset, DataConfig(dataset_mixture={path: 1.0}, max_length=400)) == 400
    longer = MixtureDataset({path: 1.0}, max_length=2000, num_sequences=4, seed=0)
    with pytest.raises(RecipeError, match=r"packed at 1000 tokens \(unknown mode\), shorter than max_length=2000"):
        check_packed_lengths(longer, DataConfig(dataset_mixture={path: 1.0}, max_length=2000))
