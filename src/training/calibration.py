"""Post-training calibration of the keep threshold, so that measured sparsity meets the target.

Adding the same shift to beta in every layer raises or lowers every interaction score by that
amount, and the hard mask keeps a token only while all its scores are positive. So the measured
sparsity falls monotonically as the shift grows, and bisection on the shift reaches the target on
calibration blocks to within the tolerance (or the closest reachable value).
"""

import logging
import math

import torch

from src.dcp import DCPGPT2LMHeadModel

logger = logging.getLogger(__name__)


@torch.no_grad()
def hard_sparsity(model: DCPGPT2LMHeadModel, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean over layers of the fraction of valid pairs that the hard mask drops, on blocks (N, T)."""
    keep_sum, pair_count = 0.0, 0.0
    for start in range(0, len(blocks), batch_size):
        output = model(blocks[start : start + batch_size])
        keep_sum = keep_sum + output.layer_keep_sum.double()
        pair_count = pair_count + output.layer_pair_count.double()
    return float(1.0 - (keep_sum / pair_count.clamp_min(1)).mean())


@torch.no_grad()
def calibrate_beta(
    model: DCPGPT2LMHeadModel,
    blocks: torch.Tensor,
    target_sparsity: float,
    tolerance: float = 0.005,
    max_shift: float = 8.0,
    steps: int = 24,
) -> dict:
    """Shift beta of every layer by one amount so that hard sparsity on `blocks` meets the target.

    Returns the shift and the sparsity before and after. The model is left in eval mode with the
    shifted betas.
    """
    was_training = model.training
    model.eval()
    model.set_alpha(math.inf)
    original = [layer.beta.detach().clone() for layer in model.dcp_layers]

    def sparsity_at(shift: float) -> float:
        for layer, beta in zip(model.dcp_layers, original):
            layer.beta.copy_(beta + shift)
        return hard_sparsity(model, blocks)

    before = sparsity_at(0.0)
    low, high = -max_shift, max_shift  # sparsity(low) >= sparsity(high)
    shift, after = 0.0, before
    for _ in range(steps):
        if abs(after - target_sparsity) <= tolerance:
            break
        if after > target_sparsity:
            low = shift  # too much dropped: raise beta
        else:
            high = shift
        shift = 0.5 * (low + high)
        after = sparsity_at(shift)

    sparsity_at(shift)
    model.train(was_training)
    logger.info("calibrated beta by %+.4f: sparsity %.3f -> %.3f (target %.3f)", shift, before, after, target_sparsity)
    return {"calibration/beta_shift": shift, "calibration/sparsity_before": before, "calibration/sparsity_after": after}
