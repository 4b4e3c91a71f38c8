"""gr-models: HSTU retrieval and ranking models, data pipeline and metrics."""

__version__ = "0.1.0"
