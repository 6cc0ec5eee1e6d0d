"""Checkpoints and resume (checkpoints.py), the atomic final save (final_save.py), the fsync helpers both use
(fsync.py)."""
