"""Thin Hydra entry points (tsd-train, tsd-data, tsd-bench, tsd-pipeline, ...)."""
