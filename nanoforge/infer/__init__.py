"""Inference: the generation engine (KV cache, sampling, streaming) and the `sample` command."""
