"""The run: the entry (`train.run_job`), config composition and validation, callbacks, checkpoints, the console."""
