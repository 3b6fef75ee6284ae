"""Training: TOML config, data, optimizer and schedule, metrics, checkpoints and the loop.

Entry point: `python -m ep_fp8.train --config FILE [--section.key=value ...]`.
"""

from ep_fp8.train.config import Config, ConfigError, load_config
from ep_fp8.train.loop import NonFiniteLossError, train

__all__ = ["Config", "ConfigError", "NonFiniteLossError", "load_config", "train"]
