"""Checkpoints and resume (checkpoints.py), the atomic final save (final_save.py)."""
