"""Baselines kept only to compare CHAI against (the intra-inference cache is a pipeline
option of the product; see chaid.engine.intra_cache)."""
