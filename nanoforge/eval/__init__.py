"""Evaluation: bits per byte, multiple-choice and generative tasks, lm-eval adapter, tables."""
