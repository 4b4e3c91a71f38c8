"""gr-parallel installs with its declared dependencies (gr-models, gr-dynemb, TorchRec, Megatron-Core) satisfied."""


def test_installs_with_its_dependencies(check_installed) -> None:
    check_installed("gr-parallel", "gr_parallel")
    import megatron.core  # noqa: F401  (imports on a CPU-only machine)
