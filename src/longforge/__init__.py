"""longforge: extend the context window of a pretrained causal language model."""

__version__ = "0.1.0"
