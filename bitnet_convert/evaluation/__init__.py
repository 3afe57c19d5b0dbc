"""Evaluation: perplexity and lm-eval tasks, the report format, and the baseline and gate policy of
``bitnet-convert eval``."""
