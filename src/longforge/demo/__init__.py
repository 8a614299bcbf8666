"""The embedded default: a local corpus, a small base model, and the demo recipe."""
