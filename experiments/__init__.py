"""Experiments: benchmarks and (with Hydra) the papers' figures, tables and ablations."""
