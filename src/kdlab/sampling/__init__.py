"""Sampling: the sampler interface, `generate` and the compiled loop, the sampling layers, samples across tokenizers."""
