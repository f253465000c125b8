"""minpro's `openai` sampler: any OpenAI-compatible completions server, asked for token ids and log-probs."""
