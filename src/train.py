"""Fine-tune a GPT-2 with Dynamic Context Pruning: `python -m src.train sparsity=0.5`.

A Hydra app: every setting comes from conf/train.yaml and its groups, and `-m` sweeps run locally or
on SLURM (`hydra/launcher=submitit_slurm`). `sparsity=0` or `pruning=dense` trains the dense baseline
with the same recipe.
"""

import logging

import hydra
from omegaconf import DictConfig

from src.training.loading import load_causal_lm, to_dcp
from src.training.run import run_training
from src.training.validation import validate_sparsity

logger = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    validate_sparsity(cfg.sparsity)
    enabled = bool(cfg.pruning.enabled) and cfg.sparsity > 0
    model = load_causal_lm(cfg.init_from)
    model = to_dcp(model, enabled, cfg.pruning.rank, cfg.pruning.beta_init, cfg.pruning.add_previous_mask)

    metrics = run_training(cfg, model)
    logger.info("finished: %s", {key: round(value, 4) for key, value in metrics.items()})
    return metrics.get("val/loss", float("nan"))


if __name__ == "__main__":
    main()
