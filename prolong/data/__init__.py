"""ProLong data pipeline: raw text -> tokenized documents -> packed long/short/sft sequences.

The `prolong-data` command (`prolong.data.cli`) wraps these functions; docs/data.md describes the
on-disk formats. (The train-time domain mixture lives in `prolong.training.mixture`.)
"""

from .pack import MODES, best_fit_decreasing, pack_dataset, packed_features
from .storage import METADATA_FILENAME, atomic_output_dir, read_metadata

__all__ = ["MODES", "METADATA_FILENAME", "atomic_output_dir", "best_fit_decreasing", "pack_dataset",
           "packed_features", "read_metadata"]
