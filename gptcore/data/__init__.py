"""Corpus preparation, torch-free: sources, cleaning, dedup and splits (ingest), the BPE tokenizer
and token shards, labelled passages and chat data."""
