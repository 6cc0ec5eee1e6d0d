"""Checkpoints and resume (checkpoints.py), the atomic final save (final_save.py), where a run may write and one run
at a time (ownership.py), what a run is (identity.py), content digests (digest.py), the fsync helpers (fsync.py)."""
