"""The train-time domain mixture: packed datasets sampled by token share, deterministically.

``MixtureDataset`` is a map-style dataset whose item ``i`` is a pure function of ``(seed, i)``:

* Items are laid out in blocks of ``block_size``; each block holds every domain's exact share of
  the block (largest-remainder rounding), shuffled by a generator seeded with ``(seed, block)``.
  So any 1,000 consecutive sequences match the target shares to within a few tenths of a point.
* The k-th item of a domain is row ``perm_epoch[k % n]`` of that domain, with a fresh seeded
  permutation for every pass over the domain.

Because nothing depends on iteration history, the exact data position of a run is the number of
sequences it consumed, which every checkpoint records (``prolong.checkpoint.checkpoints``): a resumed run
calls ``start_at(consumed)`` and continues at the next unseen sequence, also with another
``global_batch_size`` (no data is read to skip, no sequence is repeated or dropped, the same
result with any number of dataloader workers). Rows are read from memory-mapped Arrow files, so
memory does not grow with the corpus.
"""

from __future__ import annotations

import logging
import math
import os
from functools import lru_cache

import numpy as np
import pyarrow.compute as pc
from datasets import load_from_disk
from torch.utils.data import Dataset

from prolong.data.hub import resolve_dataset_dir
from prolong.data.storage import longest_row, read_metadata
from prolong.errors import RecipeError

logger = logging.getLogger(__name__)


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    raw = shares * total
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def _row_lengths(dataset) -> np.ndarray:
    """Tokens per row, read from the Arrow column's offsets (no row is decoded)."""
    column = dataset.with_format("arrow", columns=["input_ids"])[:]["input_ids"]
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def _slice_example(example: dict, start: int, end: int) -> dict:
    """Tokens [start, end) of a packed example, with its document spans cut to match."""
    spans = [
        [max(s, start) - start, min(e, end) - start] for s, e in example["indices"] if min(e, end) > max(s, start)
    ]
    out = {"input_ids": example["input_ids"][start:end], "indices": spans, "domain": example.get("domain")}
    if example.get("mask") is not None:
        out["mask"] = example["mask"][start:end]
    return out


class MixtureDataset(Dataset):
    def __init__(
        self,
        mixture: dict[str, float],
        max_length: int,
        num_sequences: int,
        seed: int = 42,
        block_size: int = 1000,
    ):
        if not mixture:
            raise RecipeError("dataset_mixture is empty: give at least one `path: share` entry.")
        total = sum(mixture.values())
        if any(p < 0 for p in mixture.values()) or not math.isclose(total, 1.0, abs_tol=1e-6):
            raise RecipeError(
                f"dataset_mixture shares must be >= 0 and sum to 1, they sum to {total:.6g}: {mixture}. "
                "Rescale them."
            )
        self.paths = [p for p, share in mixture.items() if share > 0]
        self.shares = [share for share in mixture.values() if share > 0]
        self.seed, self.block_size, self.num_sequences, self.max_length = seed, block_size, num_sequences, max_length
        self.first = 0  # item i of this dataset is sequence first + i of the mixture's stream
        # per domain: rows longer than max_length are cut into pieces; `piece_ends` (cumulative
        # pieces per row) maps an item to its (row, piece), None when every row is one item
        self.datasets, self.piece_ends, self.num_items, item_tokens = [], [], [], []
        self.local_paths = []  # where each domain is on disk (a hf://datasets entry: the download)
        self.packed_lengths, self.modes = [], []  # as prolong-data packed each domain (check_packed_lengths)
        for path in self.paths:
            path = resolve_dataset_dir(path)  # hf://datasets/ORG/NAME/CONFIG: downloaded (cached)
            self.local_paths.append(path)
            if not os.path.isdir(path):
                raise RecipeError(
                    f"dataset_mixture: '{path}' does not exist. Build it with `prolong-data pack` "
                    "(or `make demo-data` for the demo)."
                )
            try:
                dataset = load_from_disk(path)
            except Exception as error:  # datasets cannot even open an empty (0-shard) dataset
                raise RecipeError(
                    f"dataset_mixture: '{path}' has no sequences or is not a dataset saved by `prolong-data pack` "
                    f"({type(error).__name__}: {error})."
                ) from error
            if len(dataset) == 0:
                raise RecipeError(f"dataset_mixture: '{path}' has no sequences.")
            if "input_ids" not in dataset.column_names or "indices" not in dataset.column_names:
                raise RecipeError(
                    f"dataset_mixture: '{path}' is not a packed dataset (needs input_ids and indices); "
                    "run `prolong-data pack` on it."
                )
            metadata = read_metadata(path) or {}
            # no metadata (a dataset not written by prolong-data): its longest row, from the Arrow offsets
            length = int(metadata.get("length") or 0) or longest_row(dataset)
            self.packed_lengths.append(length)
            self.modes.append(metadata.get("mode"))
            pieces = math.ceil(length / max_length)
            if pieces > 1:
                logger.warning(
                    "%s holds %d-token sequences, longer than max_length=%d: each is split into %d pieces "
                    "(documents crossing a cut continue as new documents).",
                    path,
                    length,
                    max_length,
                    pieces,
                )
            row_lengths = _row_lengths(dataset)
            if pieces > 1:  # rows can be shorter than `length` (sft bins; a last short row): no empty pieces
                piece_ends = np.cumsum(np.maximum(-(-row_lengths // max_length), 1))
                num_items = int(piece_ends[-1])
            else:
                piece_ends, num_items = None, len(dataset)
            self.datasets.append(dataset.with_format("numpy"))  # rows as arrays, not lists of Python ints
            self.piece_ends.append(piece_ends)
            self.num_items.append(num_items)
            item_tokens.append(int(row_lengths.sum()) / num_items)  # the mean, not the nominal length
        # Token shares -> item shares: a domain of shorter items needs proportionally more of them.
        token_shares = np.array([mixture[p] for p in self.paths], dtype=np.float64)
        item_shares = token_shares / np.array(item_tokens)
        item_shares /= item_shares.sum()
        self.block_counts = _largest_remainder(item_shares, block_size)
        self._block_order = lru_cache(maxsize=4)(self._make_block_order)
        self._permutation = lru_cache(maxsize=2 * len(self.paths))(self._make_permutation)

    def __len__(self) -> int:
        return self.num_sequences

    def start_at(self, position: int) -> None:
        """Make item 0 the mixture's sequence ``position`` (a resumed run's next unseen sequence)."""
        self.first = int(position)

    def stream_identity(self) -> dict:
        """What fixes the stream's order (recorded in each checkpoint): a resumed run with another
        seed or mixture would continue at the right position of another stream."""
        shares = dict(zip(self.paths, (float(share) for share in self.shares)))
        return {"seed": self.seed, "max_length": self.max_length, "block_size": self.block_size,
                "dataset_mixture": shares}

    def _make_block_order(self, block: int) -> np.ndarray:
        order = np.repeat(np.arange(len(self.paths)), self.block_counts)
        np.random.default_rng([self.seed, block]).shuffle(order)
        return order

    def _make_permutation(self, domain: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 1_000_003 + domain, epoch]).permutation(self.num_items[domain])

    def locate(self, index: int) -> tuple[int, int, int]:
        """(domain, row, piece) of item ``index``."""
        if not 0 <= index < self.num_sequences:
            raise IndexError(index)
        index += self.first
        block, offset = divmod(index, self.block_size)
        order = self._block_order(block)
        domain = int(order[offset])
        occurrence = block * int(self.block_counts[domain]) + int((order[:offset] == domain).sum())
        epoch, k = divmod(occurrence, self.num_items[domain])
        item = int(self._permutation(domain, epoch)[k])
        piece_ends = self.piece_ends[domain]
        if piece_ends is None:
            return domain, item, 0
        row = int(np.searchsorted(piece_ends, item, side="right"))
        return domain, row, item - (int(piece_ends[row - 1]) if row else 0)

    def __getitem__(self, index: int) -> dict:
        domain, row, piece = self.locate(index)
        example = self.datasets[domain][row]
        example.setdefault("domain", os.path.basename(self.paths[domain].rstrip("/")))
        if self.piece_ends[domain] is not None or len(example["input_ids"]) > self.max_length:
            start = piece * self.max_length
            example = _slice_example(example, start, start + self.max_length)
        return example

    def attention_cost(self, index: int) -> int:
        """sum(doc_len^2) of item ``index``: its attention work, for load balancing."""
        example = self[index]
        return int(sum((int(e) - int(s)) ** 2 for s, e in example["indices"]))


class BalancedOrder(Dataset):
    """Reorders each optimizer step's items so every device gets the same attention work.

    ProLong's load balancing (+11.7% tokens/s): within a block of ``micro_batch x processes x
    accumulation`` items, sort by sum(doc_len^2) and deal them out snake-wise to the processes.
    The layout matches accelerate's sharding: consecutive micro-batches go to processes in turn.
    """

    def __init__(self, dataset: MixtureDataset, micro_batch: int, num_processes: int, accumulation: int):
        self.dataset, self.micro_batch, self.num_processes = dataset, micro_batch, num_processes
        self.block = micro_batch * num_processes * accumulation
        self._block_layout = lru_cache(maxsize=2)(self._make_block_layout)

    def __len__(self) -> int:
        return len(self.dataset) - len(self.dataset) % self.block

    def start_at(self, position: int) -> None:
        """Blocks start at the mixture's sequence ``position``: a resumed run (possibly with another
        batch size) balances exactly the sequences it has not seen yet."""
        self.dataset.start_at(position)
        self._block_layout.cache_clear()

    def stream_identity(self) -> dict:
        return {**self.dataset.stream_identity(), "balanced_block": self.block}

    def _make_block_layout(self, block: int) -> list[int]:
        first = block * self.block
        items = sorted(range(first, first + self.block), key=self.dataset.attention_cost, reverse=True)
        per_process: list[list[int]] = [[] for _ in range(self.num_processes)]
        for rank_in_round, item in enumerate(items):
            round_, pos = divmod(rank_in_round, self.num_processes)
            per_process[pos if round_ % 2 == 0 else self.num_processes - 1 - pos].append(item)
        layout = []
        steps = len(per_process[0]) // self.micro_batch
        for step in range(steps):
            for process in per_process:
                layout += process[step * self.micro_batch : (step + 1) * self.micro_batch]
        return layout

    def __getitem__(self, index: int) -> dict:
        block, offset = divmod(index, self.block)
        return self.dataset[self._block_layout(block)[offset]]


def build_train_dataset(data, args) -> tuple[Dataset, int]:
    """The run's training stream (``data``: DataConfig, ``args``: CPTConfig) and the sequence length it
    trains at; refuses a mixture whose domains were packed shorter than ``max_length`` (see
    ``check_packed_lengths``) before any model is loaded."""
    if not data.dataset_mixture:
        raise RecipeError("dataset_mixture is missing: map packed dataset directories to token shares.")
    if args.max_steps <= 0:
        raise RecipeError("max_steps must be set: the mixture is sampled by steps, not epochs.")
    data_parallel = args.world_size // args.sequence_parallel_size
    sequences_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * data_parallel
    mixture = MixtureDataset(
        data.dataset_mixture, data.max_length, num_sequences=args.max_steps * sequences_per_step, seed=args.seed
    )
    trained_length = check_packed_lengths(mixture, data)
    log_mixture_summary(mixture, data.dataset_mixture)
    if not data.balance_attention_cost:
        return mixture, trained_length
    balanced = BalancedOrder(mixture, args.per_device_train_batch_size, data_parallel, args.gradient_accumulation_steps)
    return balanced, trained_length


def log_mixture_summary(mixture: MixtureDataset, shares: dict) -> None:
    """One block at start: what each domain holds and how often the run will see it."""
    lines = [f"Data mixture: {mixture.num_sequences} sequences of <= {mixture.max_length} tokens"]
    for path, items, count in zip(mixture.paths, mixture.num_items, mixture.block_counts):
        drawn = mixture.num_sequences * int(count) / mixture.block_size
        lines.append(f"  {shares[path]:>6.1%} of tokens  {path}: {items} sequences, ~{drawn:.0f} drawn "
                     f"({drawn / items:.2f} epochs)")
    logger.info("\n".join(lines))


def check_packed_lengths(mixture: MixtureDataset, data) -> int:
    """Compare ``max_length`` with the length each domain was packed at; return the length trained.

    A domain packed shorter than max_length gives rows of its packed length, so a context-extension
    run would silently train short. Long data must reach max_length; short data may be packed
    shorter only where the recipe lists it in ``allow_packed_shorter``.
    """
    allowed = set(data.allow_packed_shorter or [])
    trained = 0
    for path, length, mode in zip(mixture.paths, mixture.packed_lengths, mixture.modes):
        if length < data.max_length:
            what = f"dataset_mixture: {path} was packed at {length} tokens ({mode or 'unknown'} mode), shorter than max_length={data.max_length}"
            if mode == "long":
                raise RecipeError(
                    f"{what}: its long documents were cut at {length} tokens, so the run would train at {length}, not "
                    f"{data.max_length}. Re-pack it with `prolong-data pack --mode long --length {data.max_length}`, "
                    f"or set max_length: {length}."
                )
            if path not in allowed:
                raise RecipeError(
                    f"{what}: its rows would train at {length} tokens. Re-pack it with `prolong-data pack --length "
                    f"{data.max_length}`, set max_length: {length}, or, if this short data is packed shorter on "
                    "purpose, list the path under allow_packed_shorter."
                )
        trained = max(trained, min(length, data.max_length))
        logger.info("Domain %s: packed at %d tokens (%s mode), trained at %d", path, length, mode or "unknown",
                    min(length, data.max_length))
    if trained < data.max_length:
        logger.warning("Every domain is packed shorter than max_length=%d: training at %d tokens per sequence.",
                       data.max_length, trained)
    logger.info("Training sequence length: %d tokens", trained)
    return trained
