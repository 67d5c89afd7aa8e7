"""Hydra entry point of the interpretability views: python -m src.interpret tag=dcp-0.5 (see conf/interpret.yaml)."""

import hydra
from omegaconf import DictConfig

from src.eval.interpret import run_stage


@hydra.main(version_base="1.3", config_path="../conf", config_name="interpret")
def main(cfg: DictConfig) -> None:
    run_stage(cfg)


if __name__ == "__main__":
    main()
