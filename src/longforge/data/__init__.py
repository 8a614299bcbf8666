"""Data engineering: sources, sampling plans, packing and the shard store."""
