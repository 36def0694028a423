"""The teacher outside the training process: a server speaking vLLM's `prompt_logprobs`, its client, and a cache of
top-k teacher log-probabilities (see docs/teacher_outside.md). Not yet wired into the training step."""
