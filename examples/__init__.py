"""End-to-end examples composed from the gr-stack packages (run from the repository root)."""
