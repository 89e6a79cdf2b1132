"""Offline data preparation: load, render, tokenize and pack a dataset into padless shards."""
