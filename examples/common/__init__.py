"""Infrastructure shared by the example trainers: typed TOML configs, checkpoints, run logging, the CLI and the
checkpointed epoch loop."""
