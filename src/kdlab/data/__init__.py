"""Tasks, synthetic data, tokenization and batching."""
