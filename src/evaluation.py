"""Held-out perplexity and measured sparsity of a (DCP or dense) GPT-2 at hard drops (alpha = inf).

Conventions:
- Perplexity is exp of the token-weighted mean negative log-likelihood over the whole split: every
  token after the first is predicted exactly once. The split is one packed stream of documents
  separated by the end-of-text token.
- The stream is cut into windows of `window` tokens that start every `stride` tokens. The first
  window scores all its predictions; each later window scores only its last `stride` predictions,
  so with stride < window every scored token sees at least window - stride tokens of context. A
  final partial window scores the tail. Consecutive windows overlap by at least one token, so
  stride = window gives an effective stride of window - 1.
- Measured sparsity is 1 - (kept valid pairs / valid pairs) with the hard mask, summed over all
  windows, per layer and overall (the mean over layers of the per-layer fractions).
"""

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from src.dcp import DCPGPT2LMHeadModel

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Totals of one evaluation pass; `summary()` turns them into metrics."""

    nll_sum: float = 0.0
    scored_tokens: int = 0
    windows: int = 0
    layer_keep: list[float] = field(default_factory=list)
    layer_pairs: list[float] = field(default_factory=list)

    def add_layers(self, keep: torch.Tensor, pairs: torch.Tensor) -> None:
        if not self.layer_keep:
            self.layer_keep = [0.0] * len(keep)
            self.layer_pairs = [0.0] * len(keep)
        for layer in range(len(keep)):
            self.layer_keep[layer] += float(keep[layer])
            self.layer_pairs[layer] += float(pairs[layer])

    def summary(self) -> dict:
        if self.scored_tokens == 0:
            raise ValueError("no tokens were scored; the split is shorter than two tokens")
        loss = self.nll_sum / self.scored_tokens
        layer_sparsity = [1.0 - keep / max(pairs, 1.0) for keep, pairs in zip(self.layer_keep, self.layer_pairs)]
        return {
            "loss": loss,
            "perplexity": math.exp(loss),
            "sparsity": float(np.mean(layer_sparsity)) if layer_sparsity else 0.0,
            "layer_sparsity": layer_sparsity,
            "scored_tokens": self.scored_tokens,
            "windows": self.windows,
        }


def window_starts(num_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Return (start, first scored prediction index within the window) for each window."""
    if window < 2:
        raise ValueError(f"window={window} must be at least 2 tokens")
    if not 1 <= stride <= window:
        raise ValueError(f"stride={stride} must be between 1 and window={window}")
    if num_tokens < 2:
        return []

    starts = [(0, 0)]
    scored_until = min(window, num_tokens)  # tokens 1 .. scored_until-1 are predicted by window 0
    start = 0
    while scored_until < num_tokens:
        # Overlap by at least one token, so that the first new token has a predecessor in the window.
        start = min(start + stride, scored_until - 1)
        # Prediction i of a window is of token start + i + 1; skip the tokens already scored.
        starts.append((start, scored_until - start - 1))
        scored_until = min(start + window, num_tokens)
    return starts


@torch.no_grad()
def evaluate_tokens(
    model: DCPGPT2LMHeadModel,
    tokens: np.ndarray,
    window: int,
    stride: int | None = None,
    batch_size: int = 8,
    max_windows: int | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Perplexity and hard-mask sparsity of `model` on a token stream (see module docstring)."""
    stride = stride or window
    model.eval()
    model.set_alpha(math.inf)
    plan = window_starts(len(tokens), window, stride)
    if max_windows is not None:
        plan = plan[:max_windows]

    result = EvalResult()
    for batch_start in range(0, len(plan), batch_size):
        batch_plan = plan[batch_start : batch_start + batch_size]
        _evaluate_batch(model, tokens, window, batch_plan, result, device)
    return result.summary()


def _evaluate_batch(model, tokens: np.ndarray, window: int, plan, result: EvalResult, device) -> None:
    """Run one right-padded batch of windows and add its losses and keep counts to `result`."""
    rows = [np.asarray(tokens[start : start + window], dtype=np.int64) for start, _ in plan]
    length = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.from_numpy(row)
        attention_mask[index, : len(row)] = 1

    output = model(input_ids.to(device), attention_mask=attention_mask.to(device))
    log_probs = F.log_softmax(output.logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    targets = input_ids[:, 1:].to(device)
    nll = -log_probs.gather(-1, targets[..., None])[..., 0]  # (B, T-1)

    for index, (row, (_, first_new)) in enumerate(zip(rows, plan)):
        scored = nll[index, first_new : len(row) - 1]
        result.nll_sum += float(scored.sum())
        result.scored_tokens += scored.numel()
    result.windows += len(rows)
    result.add_layers(output.layer_keep_sum.cpu(), output.layer_pair_count.cpu())
