"""Evaluation: generations scored by the task, the mismatch measures, re-measuring finished runs, the task metrics."""
