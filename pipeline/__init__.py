"""Spark pipeline for 784-feature, 10-class digit data: ingest, train, score."""

__version__ = "0.1.0"
