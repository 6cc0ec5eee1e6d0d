"""Checkpoints and resume (checkpoints.py), the final save and run outputs (outputs.py)."""
