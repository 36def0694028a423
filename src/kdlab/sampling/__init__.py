"""Sampling: the sampler interface, Hugging Face `generate` and the compiled loop, the sampling layers, retokenizing samples."""
