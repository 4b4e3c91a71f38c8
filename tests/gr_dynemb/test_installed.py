"""gr-dynemb installs alone (its own matrix env) with its declared dependencies satisfied."""


def test_installs_alone(check_installed) -> None:
    check_installed("gr-dynemb", "gr_dynemb")
