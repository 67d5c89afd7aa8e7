"""Checks that run before any long work: each bad value stops with one error naming it and the fix."""

import logging
from pathlib import Path

from omegaconf import DictConfig

from .loading import load_split, read_stats

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A composed config that cannot run as given."""


def validate_sparsity(sparsity: float) -> None:
    if not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(
            f"sparsity={sparsity} is outside [0, 1); it is the target fraction of context dropped "
            "(0 gives the dense baseline, 0.8 drops 80%)"
        )


def validate_data(cfg: DictConfig, vocab_size: int, n_positions: int) -> None:
    """The prepared data exists, fits the model's vocabulary and holds at least one block per split."""
    data_dir = Path(cfg.data_dir)
    stats = read_stats(data_dir)
    if cfg.block_size > n_positions:
        raise ConfigError(
            f"block_size={cfg.block_size} exceeds the model's context of {n_positions} positions; "
            f"set block_size<={n_positions}"
        )
    if stats["vocab_size"] > vocab_size:
        raise ConfigError(
            f"the data in {data_dir} uses {stats['vocab_size']} token ids but the model's vocabulary has "
            f"{vocab_size}; prepare the data with the model's tokenizer (data.tokenizer=...)"
        )
    for split in ("train", "val"):
        tokens = len(load_split(data_dir, split))
        if tokens < cfg.block_size:
            raise ConfigError(
                f"the {split} split of {data_dir} has {tokens} tokens, fewer than one block of "
                f"block_size={cfg.block_size}; lower block_size or prepare a larger corpus"
            )


def validate_launcher(trainer: DictConfig, launcher: DictConfig | None) -> None:
    """SLURM tasks must match Lightning's devices and nodes, and GPU requests the accelerator.

    Lightning silently trains on fewer devices when SLURM starts fewer tasks than trainer.devices.
    Launchers without tasks_per_node (basic, joblib, submitit_local) are not checked.
    """
    if launcher is None or launcher.get("tasks_per_node") is None:
        return

    tasks = launcher.get("tasks_per_node")
    if int(tasks) != int(trainer.devices):
        raise ConfigError(
            f"hydra.launcher.tasks_per_node={tasks} but trainer.devices={trainer.devices}; Lightning needs "
            "one SLURM task per device, so set both to the same number"
        )
    nodes = launcher.get("nodes")
    if nodes is not None and int(nodes) != int(trainer.num_nodes):
        raise ConfigError(
            f"hydra.launcher.nodes={nodes} but trainer.num_nodes={trainer.num_nodes}; set both to the same number"
        )
    gpus = launcher.get("gpus_per_node")
    if gpus and trainer.accelerator == "cpu":
        raise ConfigError(
            f"hydra.launcher.gpus_per_node={gpus} requests GPUs but trainer.accelerator=cpu; use "
            "trainer=gpu or trainer=ddp, or set hydra.launcher.gpus_per_node=null on a CPU cluster"
        )
    if not gpus and trainer.accelerator in ("gpu", "cuda"):
        raise ConfigError(
            f"trainer.accelerator={trainer.accelerator} but hydra.launcher.gpus_per_node={gpus}; set "
            f"hydra.launcher.gpus_per_node={trainer.devices}"
        )


def _launcher_config() -> DictConfig | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().launcher
    except (ImportError, ValueError):
        return None


def validate_run_config(cfg: DictConfig, model) -> None:
    """Run every check for a training run of `model`."""
    validate_sparsity(cfg.get("sparsity", 0.0))
    validate_launcher(cfg.trainer, _launcher_config())
    validate_data(cfg, model.config.vocab_size, model.config.n_positions)
    if cfg.steps < 1:
        raise ConfigError(f"steps={cfg.steps} must be at least 1")
