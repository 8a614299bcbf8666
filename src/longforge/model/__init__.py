"""Model-side pieces: attention back-ends."""
