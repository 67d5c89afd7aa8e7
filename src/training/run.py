"""One training run from a composed config: validate, build, fit with Lightning, save, track.

Used by `python -m src.train` (DCP fine-tuning) and `python -m src.base` (the dense base model).
"""

import json
import logging
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from src import tracking
from src.dcp import DCPGPT2LMHeadModel

from .data import ContiguousBlocks, RandomBlocks
from .loading import load_split, load_tokenizer, read_stats
from .module import DCPLightningModule, OptimSettings, PruningSettings
from .validation import validate_run_config

logger = logging.getLogger(__name__)


class _SeededDataModule(L.LightningDataModule):
    """Serves RandomBlocks that start where the restored global step left off."""

    def __init__(self, cfg: DictConfig, train_tokens, val_tokens):
        super().__init__()
        self.cfg = cfg
        self.train_tokens = train_tokens
        self.val_tokens = val_tokens

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        samples_per_step = self.cfg.batch_size * trainer.accumulate_grad_batches * trainer.world_size
        remaining_steps = max(self.cfg.steps - trainer.global_step, 1)
        dataset = RandomBlocks(
            self.train_tokens,
            self.cfg.block_size,
            num_samples=remaining_steps * samples_per_step,
            seed=self.cfg.seed,
            start=trainer.global_step * samples_per_step,
        )
        return DataLoader(dataset, batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        dataset = ContiguousBlocks(self.val_tokens, self.cfg.block_size, max_blocks=self.cfg.val_blocks)
        return DataLoader(dataset, batch_size=self.cfg.batch_size, shuffle=False)


def _mlflow_logger(cfg: DictConfig, out_dir: Path, resuming: bool) -> MLFlowLogger:
    """Open the MLflow run of this job, or reopen the one recorded in out_dir when resuming."""
    record = tracking.read_run_file(out_dir) if resuming else None
    tags = {"stage": cfg.stage, "target_sparsity": str(cfg.get("sparsity", 0.0)), **(cfg.mlflow.tags or {})}
    sweep = _sweep_id()
    if sweep:
        tags["sweep"] = sweep
    return MLFlowLogger(
        experiment_name=cfg.mlflow.experiment,
        run_name=cfg.mlflow.run_name or out_dir.name,
        tracking_uri=tracking.tracking_uri(),
        tags=tags,
        run_id=record["run_id"] if record else None,
    )


def _sweep_id() -> str | None:
    """The Hydra multirun sweep directory, which groups the runs of one sweep in MLflow."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return str(hydra_cfg.sweep.dir)


def _flat_params(cfg: DictConfig) -> dict:
    container = OmegaConf.to_container(cfg, resolve=True)
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value

    walk("", container)
    return flat


def _build_trainer(cfg: DictConfig, out_dir: Path, mlflow_logger: MLFlowLogger) -> L.Trainer:
    checkpoint = ModelCheckpoint(
        dirpath=out_dir / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=cfg.checkpoint_every,
        save_on_train_epoch_end=True,
    )
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    # Requeueing on SLURM belongs to submitit (Hydra's launcher); Lightning must not requeue as well.
    plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
    val_every = cfg.val_every if cfg.val_every and cfg.val_every < cfg.steps else None
    return L.Trainer(
        **trainer_cfg,
        max_steps=cfg.steps,
        logger=mlflow_logger,
        callbacks=[checkpoint],
        plugins=plugins,
        val_check_interval=val_every,
        check_val_every_n_epoch=1,
        limit_val_batches=1.0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        default_root_dir=str(out_dir),
    )


def run_training(cfg: DictConfig, model: DCPGPT2LMHeadModel) -> dict:
    """Fit `model` as `cfg` says, save it to cfg.out_dir/model and return the final metrics."""
    validate_run_config(cfg, model)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")

    data_dir = Path(cfg.data_dir)
    out_dir = Path(cfg.out_dir)
    last_checkpoint = out_dir / "checkpoints" / "last.ckpt"
    resuming = bool(cfg.resume) and last_checkpoint.exists()
    if resuming:
        logger.info("resuming from %s", last_checkpoint)

    module = DCPLightningModule(
        model,
        OptimSettings(**OmegaConf.to_container(cfg.optim, resolve=True)),
        PruningSettings(**_pruning_settings(cfg)),
        target_sparsity=float(cfg.get("sparsity", 0.0)),
        total_steps=cfg.steps,
    )
    data = _SeededDataModule(cfg, load_split(data_dir, "train"), load_split(data_dir, "val"))

    mlflow_logger = _mlflow_logger(cfg, out_dir, resuming)
    trainer = _build_trainer(cfg, out_dir, mlflow_logger)
    if trainer.is_global_zero:
        tracking.write_run_file(
            out_dir, mlflow_logger.run_id, mlflow_logger.experiment_id, {"target_sparsity": cfg.get("sparsity", 0.0)}
        )
        if not resuming:
            mlflow_logger.log_hyperparams(_flat_params(cfg))

    trainer.fit(module, datamodule=data, ckpt_path=str(last_checkpoint) if resuming else None)

    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if torch.is_tensor(value)}
    metrics["global_step"] = trainer.global_step
    if trainer.is_global_zero:
        _save_outputs(cfg, module, metrics, data_dir, out_dir, mlflow_logger)
    return metrics


def _pruning_settings(cfg: DictConfig) -> dict:
    keys = PruningSettings.__dataclass_fields__.keys()
    return {key: cfg.pruning[key] for key in keys if key in cfg.pruning}


def _save_outputs(cfg, module, metrics, data_dir: Path, out_dir: Path, mlflow_logger: MLFlowLogger) -> None:
    """Write the Hugging Face model, its tokenizer and the training metrics; log them to MLflow."""
    model_dir = out_dir / "model"
    module.model.set_alpha(math.inf)
    module.model.save_pretrained(model_dir)
    load_tokenizer(data_dir).save_pretrained(model_dir)
    tracking.write_run_file(model_dir, mlflow_logger.run_id, mlflow_logger.experiment_id, {"target_sparsity": cfg.get("sparsity", 0.0)})

    summary = {"data": read_stats(data_dir).get("name", data_dir.name), **metrics}
    if module.dcp_enabled:
        summary["reg_weight"] = module.controller.weight
    metrics_path = out_dir / "train_metrics.json"
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n")
    mlflow_logger.experiment.log_artifact(mlflow_logger.run_id, str(metrics_path))
    logger.info("saved %s (global step %d)", model_dir, metrics["global_step"])
