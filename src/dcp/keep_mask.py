"""The keep mask of Dynamic Context Pruning and the statistics derived from it.

Notation (one layer, heads share the mask): s[n, j] is the interaction score of query n against an
earlier token j, p[n, j] = sparse_sigmoid(s[n, j]) and the keep probability of token j as seen from
query k is the cumulative product I[k, j] = prod_{n=j+1..k} p[n, j]. I[k, k] = 1 and I[k, j] = 0 for
j > k. A token dropped by one query stays dropped for every later query.

I is computed as log I = cumsum(log p) in float32 and clamped to LOG_KEEP_FLOOR, which is finite in
fp16 and bf16 and whose exp is exactly 0 in every float dtype. Attention then adds log I to its
logits. Masked positions (future, padding) get the dtype's minimum instead of an addition, so no
row ever becomes -inf, and the diagonal is always allowed, so no row is fully masked.
"""

import math
from dataclasses import dataclass

import torch

from .sparse_sigmoid import sparse_sigmoid

LOG_KEEP_FLOOR = -1.0e4

# Soft keep probabilities are clamped to this minimum before the log, so that the gradient of
# log p (which is p'/p) stays finite where p is tiny but not zero.
_P_MIN = 1.0e-20

# A score above 1 / (alpha - 1) for every alpha in use, given to pairs that do not enter the product.
_OUTSIDE_BAND = 1.0e6


@dataclass
class KeepStats:
    """Sums of the keep mask over valid pairs of one layer, for the sparsity loss and metrics.

    keep_sum: sum of I[k, j] over valid pairs (a scalar tensor that carries gradient in training).
    pair_count: number of valid pairs (a scalar tensor).
    hard_keep_sum: the same sum for the hard (alpha = inf) mask of the same scores; equals keep_sum
        when the mask is already hard. Training uses it to measure the sparsity reached at inference.
    """

    keep_sum: torch.Tensor
    pair_count: torch.Tensor
    hard_keep_sum: torch.Tensor | None = None

    @property
    def keep_fraction(self) -> torch.Tensor:
        return self.keep_sum / self.pair_count.clamp_min(1)


def interaction_scores(q_int: torch.Tensor, k_int: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Return s = q_int k_int^T / sqrt(r) + beta in float32.

    q_int: (B, T, r) interaction queries; k_int: (B, S, r) interaction keys; returns (B, T, S).
    """
    rank = q_int.shape[-1]
    scores = torch.matmul(q_int.float(), k_int.float().transpose(-1, -2)) / math.sqrt(rank)
    return scores + beta.float()


def valid_pairs(key_valid: torch.Tensor) -> torch.Tensor:
    """Return the (B, T, T) mask of pairs (k, j) that count for sparsity.

    A pair is valid when j < k, both tokens are real (key_valid, shape (B, T)), and k is not the last
    real token of its row, because that query predicts nothing during training.
    """
    batch, length = key_valid.shape
    positions = torch.arange(length, device=key_valid.device)
    last_real = torch.where(key_valid, positions, -1).amax(dim=-1)  # (B,)

    query_counts = key_valid & (positions[None, :] != last_real[:, None])  # (B, T)
    strictly_lower = torch.ones(length, length, dtype=torch.bool, device=key_valid.device).tril(-1)
    return strictly_lower[None] & query_counts[:, :, None] & key_valid[:, None, :]


def log_keep_mask(scores: torch.Tensor, alpha: float, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Compute log I (B, T, T) in float32 from interaction scores (B, T, T) at entmax alpha.

    alpha = inf is the hard mask used at inference: I[k, j] = 1 iff s[n, j] > 0 for all j < n <= k.
    Rows of padding queries (key_valid False) drop nothing, so padding never changes real tokens.
    """
    length = scores.shape[-1]
    contributes = torch.ones(length, length, dtype=torch.bool, device=scores.device).tril(-1)  # n > j
    contributes = contributes[None]
    if key_valid is not None:
        contributes = contributes & key_valid[:, :, None]

    if math.isinf(alpha):
        dropped_here = contributes & (scores <= 0)
        # A token is dropped for query k once any query n <= k has dropped it.
        dropped = torch.cummax(dropped_here.to(torch.uint8), dim=-2).values.bool()
        zeros = torch.zeros((), dtype=torch.float32, device=scores.device)
        return torch.where(dropped, torch.full_like(zeros, LOG_KEEP_FLOOR), zeros)

    # Only pairs n > j enter the product; a large score there puts p outside the band (p = 1 exactly)
    # so the sigmoid solves only the entries that matter.
    scores = torch.where(contributes, scores.float(), torch.full_like(scores, _OUTSIDE_BAND, dtype=torch.float32))
    p = sparse_sigmoid(scores, alpha)
    log_p = torch.where(contributes, torch.log(p.clamp_min(_P_MIN)), torch.zeros_like(p))
    return torch.cumsum(log_p, dim=-2).clamp_min(LOG_KEEP_FLOOR)


def attention_bias(log_keep: torch.Tensor, key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Build the additive attention bias (B, 1, T, T) in `dtype` from log I and the padding mask.

    Allowed pairs (j <= k, key j real) get log I; the rest get the dtype's minimum. The diagonal is
    always allowed so that padding rows stay finite.
    """
    length = log_keep.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=log_keep.device).tril()
    diagonal = torch.eye(length, dtype=torch.bool, device=log_keep.device)
    allowed = (causal[None] & key_valid[:, None, :]) | diagonal[None]

    bias = torch.where(allowed, log_keep, torch.full_like(log_keep, torch.finfo(dtype).min))
    return bias.to(dtype)[:, None]


def keep_stats(
    log_keep: torch.Tensor, key_valid: torch.Tensor, hard_log_keep: torch.Tensor | None = None
) -> KeepStats:
    """Sum I = exp(log I) over valid pairs; differentiable in soft mode.

    hard_log_keep: the hard mask of the same scores, when log_keep is soft.
    """
    pairs = valid_pairs(key_valid)
    keep_sum = torch.where(pairs, torch.exp(log_keep), torch.zeros_like(log_keep)).sum()

    if hard_log_keep is None:
        hard_keep_sum = keep_sum.detach()
    else:
        hard_keep_sum = (pairs & (hard_log_keep == 0)).sum().to(keep_sum.dtype)
    return KeepStats(keep_sum=keep_sum, pair_count=pairs.sum(), hard_keep_sum=hard_keep_sum)
