"""Ranking example: HSTU ranking or the DLRM baseline on synthetic data, MovieLens or KuaiRand-1K."""
