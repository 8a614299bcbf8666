"""Evaluation: the benchmarks (passkey, NIAH, RULER, perplexity), their registry, the eval stage and `eval compare`.

The tasks generate prompts and score answers; the generation engine they run on is longforge.inference.
"""
