"""Position encodings: RoPE scaling methods and training position-id transforms."""
