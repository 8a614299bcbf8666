"""Evaluation: passkey grids, perplexity against length, and the generation engine they share."""
