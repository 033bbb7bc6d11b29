"""Training the MS-Diffusion adapter: config, feature cache, loop (docs/training.md).

Importing this package is cheap (the CLI imports it for `--help`); torch loads with the loop.
"""

from .config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config", "train"]


def train(config: TrainConfig) -> dict:
    """Train as `config` says and return the run summary (see `loop.train`)."""
    from .loop import train as run

    return run(config)
