"""Fine-tune a GPT-2 with Dynamic Context Pruning: `python -m src.train sparsity=0.5`.

A Hydra app: every setting comes from conf/train.yaml and its groups, and `-m` sweeps run locally or
on SLURM (`hydra/launcher=submitit_slurm`). `sparsity=0` or `pruning=dense` trains the dense baseline
with the same recipe; `pruning=fixed_pattern pruning.baseline=local` fine-tunes a fixed-pattern
baseline (local, streaming_llm, h2o, strided) at the same sparsity.
"""

import logging

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from src.eval.baselines import apply_keep_policy, policy_from_config

from src.training.loading import load_causal_lm, to_dcp
from src.training.run import run_training
from src.training.validation import validate_sparsity

logger = logging.getLogger(__name__)


def attach_keep_policy(model, cfg: DictConfig) -> None:
    """Fine-tune with a fixed-pattern baseline mask at keep fraction 1 - sparsity.

    The policy's settings are stored in the model config, so that loading the saved model for
    evaluation applies the same mask again.
    """
    if cfg.sparsity <= 0:
        raise ValueError(f"pruning.baseline={cfg.pruning.baseline} needs sparsity > 0, got sparsity={cfg.sparsity}")
    settings = {
        "name": cfg.pruning.baseline,
        "keep_fraction": 1.0 - float(cfg.sparsity),
        "length": int(cfg.block_size),
        "options": OmegaConf.to_container(cfg.pruning.baseline_options, resolve=True) or {},
    }
    model.config.dcp_keep_policy = settings
    apply_keep_policy(model, policy_from_config(settings, default_length=cfg.block_size))


def build_model(cfg: DictConfig):
    """Load cfg.init_from and turn it into the model this run trains (DCP, dense or a baseline)."""
    validate_sparsity(cfg.sparsity)
    # Seed before the interaction projections are initialised, so that the same seed gives the same model.
    L.seed_everything(cfg.seed, workers=True)
    enabled = bool(cfg.pruning.enabled) and cfg.sparsity > 0
    model = load_causal_lm(cfg.init_from)
    model = to_dcp(model, enabled, cfg.pruning.rank, cfg.pruning.beta_init, cfg.pruning.add_previous_mask)
    if cfg.pruning.get("baseline"):
        attach_keep_policy(model, cfg)
    return model


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    metrics = run_training(cfg, build_model(cfg))
    logger.info("finished: %s", {key: round(value, 4) for key, value in metrics.items()})
    return metrics.get("val/loss", float("nan"))


if __name__ == "__main__":
    main()
