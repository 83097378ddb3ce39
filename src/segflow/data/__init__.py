"""Datasets, readers and the ingest contract's files: the layer every other one stands on."""
