"""Hydra entry point of the zero-shot stage: python -m src.zero_shot tag=dcp-0.5 (see conf/zero_shot.yaml)."""

import hydra
from omegaconf import DictConfig

from src.eval.zero_shot import run_stage


@hydra.main(version_base="1.3", config_path="../conf", config_name="zero_shot")
def main(cfg: DictConfig) -> None:
    run_stage(cfg)


if __name__ == "__main__":
    main()
