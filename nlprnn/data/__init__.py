"""Datasets, tokenizers and batching for text classification."""
