"""gr-kernels: HSTU attention ops for generative recommenders."""

__version__ = "0.1.0"
