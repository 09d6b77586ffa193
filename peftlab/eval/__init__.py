"""Evaluation: scoring checkpoints (loss, accuracy) and, later, generation metrics."""
