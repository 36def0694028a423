"""kdlab: knowledge distillation for language models (GKD, MultiLevelOT) on Lightning + Hydra."""

from pathlib import Path

ASSETS_DIR = Path(__file__).parent / "assets"

__version__ = "0.1.0"
