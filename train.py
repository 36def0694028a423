"""Entry point: `python train.py [group=option ...] [key=value ...]` (Hydra); see README.md."""

import hydra
from omegaconf import DictConfig

from kdlab.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from kdlab.train import run  # imported here so `--help` and config errors stay fast

    return run(cfg)


if __name__ == "__main__":
    main()
