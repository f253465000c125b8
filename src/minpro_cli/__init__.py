"""minpro: RL post-training of language models with the MinPRO objective."""

__version__ = "0.1.0"
