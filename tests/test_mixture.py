"""The train-time mixture: token shares, determinism, and exact resumption."""

from __future__ import annotations

import collections

import pytest
from accelerate import skip_first_batches
from conftest import random_documents, write_packed_dataset
from torch.utils.data import DataLoader, SequentialSampler

from prolong.collator import PackedCollator
from prolong.config import RecipeError
from prolong.data.mixture import BalancedOrder, MixtureDataset


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
    assert [first[i]["input_ids"] for i in range(200)] == [second[i]["input_ids"] for i in range(200)]
    assert [first[i]["input_ids"] for i in range(200)] != [other[i]["input_ids"] for i in range(200)]


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
