"""LightningModule for DCP fine-tuning (and for training the dense base model from scratch)."""

import logging
import math
from dataclasses import dataclass

import lightning as L
import torch

from src.dcp import DCPGPT2LMHeadModel

from .calibration import calibrate_beta
from .schedules import SparsityController, cosine_alpha

logger = logging.getLogger(__name__)


@dataclass
class OptimSettings:
    """AdamW settings. The new DCP parameters get their own, larger learning rates because the sparse
    sigmoid passes gradient only inside |s| < 1/(alpha - 1), a band that narrows as alpha grows."""

    lr: float = 5e-4
    lr_interaction: float = 2e-3
    lr_beta: float = 2e-2
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    decay: str = "constant"  # "constant" after warm-up (the reference recipe) or "cosine" to 10%


@dataclass
class PruningSettings:
    """Alpha schedule and sparsity regulariser (ignored by dense models)."""

    alpha_start: float = 1.0 + 1e-4
    alpha_end: float = 8.0
    alpha_steps: int = 0  # 0 means all training steps
    regularizer: str = "adaptive"  # "adaptive" (reach `sparsity`) or "fixed" (weight = gamma)
    gamma: float = 0.3
    controller_lr: float = 0.01
    controller_gain: float = 5.0
    controller_ema: float = 0.0
    controller_measure: str = "soft"  # keep fraction the controller tracks: "soft" (in the loss) or "hard"
    calibrate: bool = True  # adaptive mode: shift beta after training so validation sparsity meets the target


class DCPLightningModule(L.LightningModule):
    """Trains a DCPGPT2LMHeadModel with loss = cross_entropy + weight * keep_fraction.

    The weight comes from a SparsityController; alpha follows a cosine schedule over the steps. Both
    are functions of the global step and of controller state saved in checkpoints, so a resumed run
    continues the same schedule.
    """

    def __init__(
        self,
        model: DCPGPT2LMHeadModel,
        optim: OptimSettings,
        pruning: PruningSettings,
        target_sparsity: float,
        total_steps: int,
    ):
        super().__init__()
        self.model = model
        self.calibration: dict | None = None
        self.optim = optim
        self.pruning = pruning
        self.total_steps = total_steps
        self.dcp_enabled = bool(model.config.dcp_enabled)
        self.controller = SparsityController(
            target_sparsity=target_sparsity,
            mode=pruning.regularizer,
            gamma=pruning.gamma,
            lr=pruning.controller_lr,
            gain=pruning.controller_gain,
            ema=pruning.controller_ema,
        )

    def current_alpha(self) -> float:
        if not self.dcp_enabled:
            return math.inf
        alpha_steps = self.pruning.alpha_steps or self.total_steps
        return cosine_alpha(self.global_step, alpha_steps, self.pruning.alpha_start, self.pruning.alpha_end)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        alpha = self.current_alpha()
        self.model.set_alpha(alpha)
        output = self.model(batch, labels=batch)
        loss = output.loss
        self.log("train/loss_lm", output.loss, prog_bar=True)

        layer_hard_keep = (output.layer_hard_keep_sum / output.layer_pair_count.clamp_min(1)).detach()
        hard_keep = float(layer_hard_keep.mean())
        if self.dcp_enabled:
            weight = self.controller.weight
            loss = loss + weight * output.keep_fraction

            measured = hard_keep if self.pruning.controller_measure == "hard" else float(output.keep_fraction.detach())
            # Every rank must step the controller with the same value to keep the weights in sync.
            measured = float(self.trainer.strategy.reduce(torch.tensor(measured), reduce_op="mean"))
            self.controller.update(measured)

            self.log("train/alpha", alpha)
            self.log("train/reg_weight", weight)
            self.log("train/sparsity_soft", 1.0 - output.keep_fraction.detach())

        # Dense models report 0 here; fixed-pattern baselines report their mask's sparsity.
        self.log("train/sparsity", 1.0 - hard_keep, prog_bar=True)
        for layer, keep in enumerate(layer_hard_keep):
            self.log(f"train/sparsity_layer{layer}", 1.0 - keep)

        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.model.set_alpha(math.inf)
        output = self.model(batch, labels=batch)
        self.log("val/loss", output.loss, sync_dist=True)
        self.log("val/sparsity", 1.0 - output.keep_fraction, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/perplexity", torch.exp(loss), sync_dist=False)

    def configure_optimizers(self):
        groups = {"base": [], "interaction": [], "beta": []}
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            if name.endswith(("q_int.weight", "k_int.weight")):
                groups["interaction"].append(parameter)
            elif name.endswith(".beta"):
                groups["beta"].append(parameter)
            else:
                groups["base"].append(parameter)

        rates = {"base": self.optim.lr, "interaction": self.optim.lr_interaction, "beta": self.optim.lr_beta}
        param_groups = [
            {"params": params, "lr": rates[name], "name": name, "weight_decay": self.optim.weight_decay if name == "base" else 0.0}
            for name, params in groups.items()
            if params
        ]
        optimizer = torch.optim.AdamW(param_groups, betas=tuple(self.optim.betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then constant or cosine decay to 10% at total_steps."""
        warmup = self.optim.warmup_steps
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if self.optim.decay == "cosine":
            progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def on_train_end(self) -> None:
        """Calibrate the keep threshold on validation blocks (adaptive mode, see calibration.py).

        Every rank computes the same shift from the same blocks, so the replicas stay identical.
        """
        if not (self.dcp_enabled and self.pruning.calibrate and self.pruning.regularizer == "adaptive"):
            return
        datamodule = self.trainer.datamodule
        dataset = datamodule.val_dataloader().dataset
        blocks = torch.stack([dataset[index] for index in range(len(dataset))]).to(self.device)
        result = calibrate_beta(self.model, blocks, self.controller.target_sparsity)
        self.calibration = result
        if self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics(result, step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sparsity_controller"] = self.controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "sparsity_controller" in checkpoint:
            self.controller.load_state_dict(checkpoint["sparsity_controller"])
