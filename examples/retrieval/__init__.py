"""HSTU / SASRec next-item retrieval trainer (the main job): ``python -m examples.retrieval --help``."""
