"""Datasets, synthetic data, scribble variants and format converters (DESIGN section 3)."""
