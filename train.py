"""Entry point: `python train.py [group=option ...] [key=value ...]` (Hydra); see README.md."""

import sys

import hydra
from omegaconf import DictConfig

from kdlab.config import ConfigError, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from kdlab.train import run  # imported here so `--help` and config errors stay fast

    try:
        return run(cfg)
    except ConfigError as err:  # the message lists every problem and its fix; a stack trace would only bury it
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
