"""minpro's `vllm` sampler: offline vLLM in its own environment, driven over a pipe."""
