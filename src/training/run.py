"""One training run from a composed config: validate, build, fit with Lightning, save, track.

Used by `python -m src.train` (DCP fine-tuning) and `python -m src.base` (the dense base model).
"""

import contextlib
import json
import logging
import math
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, read_write
from torch.utils.data import DataLoader

from src import tracking
from src.dcp import DCPGPT2LMHeadModel

from .data import ContiguousBlocks, RandomBlocks
from .loading import load_split, load_tokenizer, read_stats
from .module import DCPLightningModule, OptimSettings, PruningSettings
from .validation import validate_run_config

logger = logging.getLogger(__name__)

# Variables that Lightning's subprocess launcher (lightning 2.6) sets in the launching process.
_LAUNCHER_ENV_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class _SeededDataModule(L.LightningDataModule):
    """Serves RandomBlocks that start where the restored global step left off.

    The training dataloader always contains the batches of the whole run. Lightning 2.6 resumes a
    checkpoint taken mid-epoch at the restored batch index, iterates a non-resumable dataloader
    from its first batch and ends the epoch after len(dataloader) batches counted from index 0.
    A dataloader of only the remaining steps would end the epoch early, and the next epoch would
    repeat its first batches.
    """

    def __init__(self, cfg: DictConfig, train_tokens, val_tokens):
        super().__init__()
        self.cfg = cfg
        self.train_tokens = train_tokens
        self.val_tokens = val_tokens

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        samples_per_step = self.cfg.batch_size * trainer.accumulate_grad_batches * trainer.world_size
        dataset = RandomBlocks(
            self.train_tokens,
            self.cfg.block_size,
            num_samples=self.cfg.steps * samples_per_step,
            seed=self.cfg.seed,
            start=trainer.global_step * samples_per_step,
        )
        return DataLoader(dataset, batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        dataset = ContiguousBlocks(self.val_tokens, self.cfg.block_size, max_blocks=self.cfg.val_blocks)
        return DataLoader(dataset, batch_size=self.cfg.batch_size, shuffle=False)


class _ExtraLastCheckpoints(Callback):
    """Write last.ckpt where ModelCheckpoint does not: after the last step and on SIGTERM.

    ModelCheckpoint writes only at multiples of checkpoint_every. Callbacks' on_train_end runs
    before the LightningModule's (Lightning 2.6), so the final checkpoint contains the trained state,
    without the beta calibration that follows. Lightning turns SIGTERM (scancel, SLURM preemption,
    a local kill) into a SIGTERMException at the end of the current step, on every DDP rank at the
    same step, so the collective save is safe there too.
    """

    def __init__(self, path: Path, every_n_steps: int):
        self.path = path
        self.every_n_steps = every_n_steps

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_steps or trainer.global_step % self.every_n_steps:
            trainer.save_checkpoint(self.path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            logger.info("SIGTERM: saved %s at global step %d", self.path, trainer.global_step)


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


def _multirun_hydra_config() -> DictConfig | None:
    """Hydra's runtime config when this process runs one job of a multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return hydra_cfg


def _sweep_id() -> str | None:
    """The Hydra multirun sweep directory, which groups the runs of one sweep in MLflow."""
    hydra_cfg = _multirun_hydra_config()
    return None if hydra_cfg is None else str(hydra_cfg.sweep.dir)


def _adopt_submitit_local_ranks() -> None:
    """Make Lightning use the tasks of a submitit local job as its DDP ranks, as it does with SLURM tasks.

    submitit's local executor (hydra/launcher=submitit_local) starts tasks_per_node processes but
    sets only its own SUBMITIT_LOCAL_* variables. Without LOCAL_RANK, Lightning would treat every
    task as a rank 0 that starts its own DDP child processes.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") != "local" or int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) < 2:
        return
    os.environ.setdefault("LOCAL_RANK", os.environ["SUBMITIT_LOCAL_LOCALID"])
    os.environ.setdefault("NODE_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # Every task derives the same port from the job id (the PID of submitit's controller process).
    # NOTE: two concurrent jobs collide only when their PIDs are equal modulo 20000.
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ["SUBMITIT_LOCAL_JOB_ID"]) % 20000))


@contextlib.contextmanager
def _ddp_children_rerun_this_job(trainer: L.Trainer) -> Iterator[None]:
    """Make the DDP processes that Lightning starts in a multirun job run this job only, once.

    Lightning's subprocess launcher (DDP without SLURM or torchrun) starts the other ranks with
    `sys.argv` plus `hydra.run.dir=<HydraConfig run.dir>`. In a multirun, sys.argv is the whole
    sweep (`-m sparsity=0.3,0.5`), so each child would start the sweep again and its jobs would join
    other jobs' process groups. Here the children get this job's overrides and its output folder.
    Afterwards the process group and the variables the launcher exported (LOCAL_RANK=0 among them)
    are removed, because the next job of the sweep runs in this process and starts new children.
    NOTE: Hydra flags such as --config-name are not passed on; only overrides are.
    """
    hydra_cfg = _multirun_hydra_config()
    if hydra_cfg is None or not isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher):
        yield
        return

    original_argv = sys.argv
    original_run_dir = hydra_cfg.run.dir
    original_env = {name: os.environ.get(name) for name in _LAUNCHER_ENV_VARIABLES}
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = original_argv
        with read_write(hydra_cfg.run):
            hydra_cfg.run.dir = original_run_dir
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in original_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
        # Overwrite last.ckpt when _ExtraLastCheckpoints wrote it first, instead of adding last-v1.ckpt.
        enable_version_counter=False,
    )
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    # Requeueing on SLURM belongs to submitit (Hydra's launcher); Lightning must not requeue as well.
    plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
    val_every = cfg.val_every if cfg.val_every and cfg.val_every < cfg.steps else None
    return L.Trainer(
        **trainer_cfg,
        max_steps=cfg.steps,
        logger=mlflow_logger,
        callbacks=[checkpoint, _ExtraLastCheckpoints(out_dir / "checkpoints" / "last.ckpt", cfg.checkpoint_every)],
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
        # _SeededDataModule restarts the data at the restored step, which this warning does not know.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

    module = DCPLightningModule(
        model,
        OptimSettings(**OmegaConf.to_container(cfg.optim, resolve=True)),
        PruningSettings(**_pruning_settings(cfg)),
        target_sparsity=float(cfg.get("sparsity", 0.0)),
        total_steps=cfg.steps,
    )
    data = _SeededDataModule(cfg, load_split(data_dir, "train"), load_split(data_dir, "val"))

    _adopt_submitit_local_ranks()
    mlflow_logger = _mlflow_logger(cfg, out_dir, resuming)
    trainer = _build_trainer(cfg, out_dir, mlflow_logger)
    logger.info(
        "rank %d of %d: target sparsity %s, %d steps, output %s",
        trainer.global_rank, trainer.world_size, cfg.get("sparsity", 0.0), cfg.steps, out_dir,
    )
    if trainer.is_global_zero:
        tracking.write_run_file(
            out_dir, mlflow_logger.run_id, mlflow_logger.experiment_id, {"target_sparsity": cfg.get("sparsity", 0.0)}
        )
        if not resuming:
            mlflow_logger.log_hyperparams(_flat_params(cfg))

    try:
        with _ddp_children_rerun_this_job(trainer):
            trainer.fit(module, datamodule=data, ckpt_path=str(last_checkpoint) if resuming else None)
    except SIGTERMException as stop:
        # Lightning's SIGTERMException is a SystemExit with status 0, which would make a stopped run look finished.
        logger.warning("SIGTERM stopped training at global step %d; rerun the same command to resume", trainer.global_step)
        raise SystemExit(128 + signal.SIGTERM) from stop

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
    if module.calibration:
        summary.update(module.calibration)
    metrics_path = out_dir / "train_metrics.json"
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n")
    mlflow_logger.experiment.log_artifact(mlflow_logger.run_id, str(metrics_path))
    logger.info("saved %s (global step %d)", model_dir, metrics["global_step"])
