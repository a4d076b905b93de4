"""Corpora, manifests, visemes, audio features, synthetic corpus, cache and the data module."""
