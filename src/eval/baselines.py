"""Fixed-pattern and heuristic KV-cache baselines, as keep policies at a given budget.

A keep policy replaces the learned DCP mask of one attention layer (`DCPAttention.keep_policy`):
`policy(layer_idx=, query=, key=, key_valid=)` returns log I of shape (B, T, T) in float32, 0 where
query k keeps token j and LOG_KEEP_FLOOR (-1e4) where it drops it. The policies follow the
conventions of the learned mask:

- a token never drops itself, and entries above the diagonal stay 0 (the causal mask hides them);
- a dropped token stays dropped for every later query, which holds for all four patterns here;
- padding queries drop nothing and padding keys are never marked, so padding does not change the
  mask of real tokens. Distances count real tokens, so a left-padded row gets the mask it has alone.

Policies:

- `local`: sliding window of the last `window` tokens (the query included).
- `streaming_llm`: the first `sinks` tokens plus a sliding window (Xiao et al., 2023, "Efficient
  Streaming Language Models with Attention Sinks").
- `h2o`: heavy hitters plus a recent window (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle"). The
  cache has room for `heavy + recent` tokens. When a new token overflows it, the cached token outside
  the recent window with the lowest attention received so far is evicted. Attention is the layer's own,
  softmax(q k^T * scale) over the cache, summed over heads.
- `strided`: a local window plus every `stride`-th column (the fixed pattern of Child et al., 2019,
  "Generating Long Sequences with Sparse Transformers", with one summary column per block).

`make_keep_policy(name, keep_fraction, length=T)` picks the window so that the policy keeps
`keep_fraction` of the valid pairs of an unpadded sequence of length T (the pairs that DCP's sparsity
counts, see `src.dcp.keep_mask.valid_pairs`), within one token per query row.
"""

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from src.dcp.keep_mask import LOG_KEEP_FLOOR, valid_pairs

logger = logging.getLogger(__name__)

POLICY_NAMES = ("local", "streaming_llm", "h2o", "strided")
_ALIASES = {
    "window": "local",
    "sliding_window": "local",
    "streaming": "streaming_llm",
    "streamingllm": "streaming_llm",
    "fixed": "strided",
    "sparse": "strided",
}


# ---------------------------------------------------------------------------------------------
# Shared helpers.


def real_positions(key_valid: torch.Tensor) -> torch.Tensor:
    """Return each token's index among the real tokens of its row, (B, T) long (0 at leading padding)."""
    return (key_valid.long().cumsum(-1) - 1).clamp_min(0)


def pattern_log_keep(keep: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Turn a boolean keep pattern (B, T, T) into log I (B, T, T) float32.

    Only real pairs strictly below the diagonal can be dropped; everything else is 0.
    """
    length = keep.shape[-1]
    lower = torch.ones(length, length, dtype=torch.bool, device=keep.device).tril(-1)
    real_pair = key_valid[:, :, None] & key_valid[:, None, :]  # (B, T, T)

    dropped = lower[None] & real_pair & ~keep
    zeros = torch.zeros((), dtype=torch.float32, device=keep.device)
    return torch.where(dropped, torch.full_like(zeros, LOG_KEEP_FLOOR), zeros)


def _distances(key_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return real positions (B, T) and distances pos[k] - pos[j] (B, T, T)."""
    positions = real_positions(key_valid)
    return positions, positions[:, :, None] - positions[:, None, :]


# ---------------------------------------------------------------------------------------------
# Policies.


@dataclass(frozen=True)
class SlidingWindow:
    """Keep the last `window` tokens, the query included."""

    window: int
    name: str = "local"

    def keep_pattern(self, key_valid: torch.Tensor) -> torch.Tensor:
        _, distance = _distances(key_valid)
        return distance < self.window

    def __call__(self, *, layer_idx: int, query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        return pattern_log_keep(self.keep_pattern(key_valid), key_valid)


@dataclass(frozen=True)
class StreamingLLM:
    """Keep the first `sinks` real tokens and the last `window` tokens, the query included."""

    sinks: int
    window: int
    name: str = "streaming_llm"

    def keep_pattern(self, key_valid: torch.Tensor) -> torch.Tensor:
        positions, distance = _distances(key_valid)
        is_sink = positions[:, None, :] < self.sinks  # (B, 1, T)
        return is_sink | (distance < self.window)

    def __call__(self, *, layer_idx: int, query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        return pattern_log_keep(self.keep_pattern(key_valid), key_valid)


@dataclass(frozen=True)
class Strided:
    """Keep the last `window` tokens and every token whose real position is stride - 1 mod stride."""

    window: int
    stride: int
    name: str = "strided"

    def keep_pattern(self, key_valid: torch.Tensor) -> torch.Tensor:
        positions, distance = _distances(key_valid)
        summary = (positions[:, None, :] % self.stride) == self.stride - 1  # (B, 1, T)
        return summary | (distance < self.window)

    def __call__(self, *, layer_idx: int, query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        return pattern_log_keep(self.keep_pattern(key_valid), key_valid)


@dataclass(frozen=True)
class HeavyHitters:
    """H2O: a cache of `heavy + recent` tokens that evicts the lowest accumulated attention.

    scale: attention logit scale; None means 1 / sqrt(d_head), GPT-2's default.
    """

    heavy: int
    recent: int
    scale: float | None = None
    name: str = "h2o"

    @property
    def budget(self) -> int:
        return self.heavy + self.recent

    def __call__(self, *, layer_idx: int, query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        log_keep, _ = h2o_log_keep(query, key, key_valid, self.heavy, self.recent, self.scale)
        return log_keep


@torch.no_grad()
def h2o_log_keep(
    query: torch.Tensor,
    key: torch.Tensor,
    key_valid: torch.Tensor,
    heavy: int,
    recent: int,
    scale: float | None = None,
    record_scores: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run H2O eviction over the sequence and return log I (B, T, T) and, on request, the eviction scores.

    query, key: (B, H, T, d_head). At step k the query's token enters the cache. If the cache then
    contains more than heavy + recent tokens, the token with the lowest accumulated attention among
    those at distance >= `recent` is evicted. The query then attends to the cache, and the attention
    it gives (summed over heads) is added to each cached token's score. With record_scores, the
    second output holds in row k the accumulated scores that the eviction at step k compared
    (B, T, T) float32; otherwise it is None.
    """
    if recent < 1 or heavy < 0:
        raise ValueError(f"h2o needs recent >= 1 (the query itself) and heavy >= 0, got recent={recent}, heavy={heavy}")

    batch, _, length, head_dim = query.shape  # (B, H, T, d_head)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    budget = heavy + recent
    _, distance = _distances(key_valid)
    device = query.device
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    outside_recent = (distance >= recent) & causal[None]  # (B, T, T): eviction candidates of each step

    in_cache = torch.zeros(batch, length, dtype=torch.bool, device=device)
    cache_size = torch.zeros(batch, dtype=torch.long, device=device)
    accumulated = torch.zeros(batch, length, dtype=torch.float32, device=device)
    keep = torch.ones(batch, length, length, dtype=torch.bool, device=device)
    eviction_scores = torch.zeros(batch, length, length, dtype=torch.float32, device=device) if record_scores else None
    rows = torch.arange(batch, device=device)
    # NOTE: all attention logits are kept, (B, H, T, T) float32, so long contexts may need chunking.
    all_logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale  # (B, H, T, T)
    all_logits = all_logits.permute(2, 0, 1, 3).contiguous()  # (T, B, H, T): one contiguous block per step

    for step in range(length):
        step_valid = key_valid[:, step]  # (B,)
        in_cache[:, step] = step_valid
        cache_size += step_valid
        if eviction_scores is not None:
            eviction_scores[:, step] = accumulated

        # Evict one token from rows whose cache overflows. A token outside the recent window
        # always exists then, because the cache contains budget + 1 > recent tokens.
        overflow = step_valid & (cache_size > budget)
        candidates = in_cache & outside_recent[:, step]
        victim = accumulated.masked_fill(~candidates, math.inf).argmin(-1)  # (B,)
        in_cache[rows[overflow], victim[overflow]] = False
        cache_size -= overflow.long()

        keep[:, step] = torch.where(step_valid[:, None], in_cache, keep[:, step])

        # Attention of this query over its cache, summed over heads: (B, T).
        logits = all_logits[step].masked_fill(~in_cache[:, None, :], -math.inf)
        received = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(1)
        accumulated += received * step_valid[:, None]

    return pattern_log_keep(keep, key_valid), eviction_scores


KeepPolicy = SlidingWindow | StreamingLLM | Strided | HeavyHitters


# ---------------------------------------------------------------------------------------------
# Budget fitting.


def kept_pairs(keep: torch.Tensor, key_valid: torch.Tensor) -> int:
    """Count the valid pairs (see `valid_pairs`) that a boolean keep pattern (B, T, T) keeps."""
    return int((keep & valid_pairs(key_valid)).sum())


def pair_count(length: int) -> int:
    """Return the number of valid pairs of one unpadded sequence of `length` tokens."""
    return int(valid_pairs(torch.ones(1, length, dtype=torch.bool)).sum())


def _fit_window(make: Callable[[int], KeepPolicy], target: float, length: int) -> KeepPolicy:
    """Return make(w) for the window w in [1, length] whose kept pair count is closest to `target`.

    The count grows with w by at most one token per query row, so the best w is within half a
    token per row of the target whenever the target lies inside the reachable range.
    """
    key_valid = torch.ones(1, length, dtype=torch.bool)

    def count(window: int) -> int:
        return kept_pairs(make(window).keep_pattern(key_valid), key_valid)

    low, high = 1, length
    while low < high:  # smallest window whose count reaches the target
        middle = (low + high) // 2
        if count(middle) >= target:
            high = middle
        else:
            low = middle + 1

    best = low
    if low > 1 and abs(count(low - 1) - target) <= abs(count(low) - target):
        best = low - 1
    return make(best)


def _check_reachable(policy: KeepPolicy, target: float, length: int, fix: str) -> None:
    """Raise when the smallest window of `policy` already keeps far more than the target."""
    key_valid = torch.ones(1, length, dtype=torch.bool)
    kept = kept_pairs(policy.keep_pattern(key_valid), key_valid)
    rows = length - 2
    if kept - target > rows:
        raise ValueError(
            f"{policy.name} cannot keep as little as {target / pair_count(length):.3f} of the pairs at "
            f"length {length}: its fixed part alone keeps {kept / pair_count(length):.3f}. {fix}"
        )


def make_keep_policy(name: str, keep_fraction: float, length: int, **kwargs) -> KeepPolicy:
    """Build the baseline `name` that keeps `keep_fraction` of the valid pairs at sequence length `length`.

    keep_fraction is 1 - sparsity, in (0, 1]. Extra keyword arguments by policy:

    - streaming_llm: sinks (default 4).
    - h2o: heavy_ratio, the share of the cache for heavy hitters (default 0.5), and scale.
    - strided: stride. The default ceil(2 / keep_fraction) gives the summary columns about half
      the budget.
    """
    canonical = _ALIASES.get(name.lower(), name.lower())
    if canonical not in POLICY_NAMES:
        raise ValueError(f"unknown keep policy {name!r}; choose one of {list(POLICY_NAMES)}")
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1] (it is 1 - sparsity), got {keep_fraction}")
    if length < 3:
        raise ValueError(f"length must be at least 3 tokens to have pairs to drop, got {length}")

    target = keep_fraction * pair_count(length)
    unexpected = set(kwargs) - {"sinks", "heavy_ratio", "scale", "stride"}
    if unexpected:
        raise TypeError(f"make_keep_policy got unexpected arguments {sorted(unexpected)}")

    if canonical == "local":
        policy = _fit_window(lambda w: SlidingWindow(window=w), target, length)
    elif canonical == "streaming_llm":
        sinks = int(kwargs.get("sinks", 4))
        _check_reachable(StreamingLLM(sinks=sinks, window=1), target, length, "Use fewer sinks.")
        policy = _fit_window(lambda w: StreamingLLM(sinks=sinks, window=w), target, length)
    elif canonical == "strided":
        stride = int(kwargs.get("stride", math.ceil(2.0 / keep_fraction)))
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        _check_reachable(Strided(window=1, stride=stride), target, length, "Use a larger stride.")
        policy = _fit_window(lambda w: Strided(window=w, stride=stride), target, length)
    else:
        heavy_ratio = float(kwargs.get("heavy_ratio", 0.5))
        if not 0.0 <= heavy_ratio < 1.0:
            raise ValueError(f"heavy_ratio must be in [0, 1), got {heavy_ratio}")
        # An H2O cache of b tokens keeps min(k + 1, b) tokens in row k, as a window of b does.
        budget = _fit_window(lambda w: SlidingWindow(window=w), target, length).window
        heavy = min(int(round(budget * heavy_ratio)), budget - 1)
        policy = HeavyHitters(heavy=heavy, recent=budget - heavy, scale=kwargs.get("scale"))

    logger.info("keep policy %s at keep fraction %.3f, length %d: %s", canonical, keep_fraction, length, describe_policy(policy))
    return policy


def describe_policy(policy: KeepPolicy) -> dict:
    """Return the policy's name and parameters, for logs and MLflow params."""
    return asdict(policy)


def policy_from_config(settings, default_length: int) -> KeepPolicy | None:
    """Build a policy from a config mapping {name, keep_fraction, length, options}; None when name is null."""
    if settings is None or settings.get("name") is None:
        return None
    if settings.get("keep_fraction") is None:
        raise ValueError(f"baseline.name={settings['name']} needs baseline.keep_fraction (1 - sparsity), for example 0.5")
    length = int(settings.get("length") or default_length)
    options = dict(settings.get("options") or {})
    return make_keep_policy(str(settings["name"]), float(settings["keep_fraction"]), length=length, **options)


def apply_keep_policy(model: torch.nn.Module, policy: Callable[..., torch.Tensor] | None) -> None:
    """Set `policy` as the keep policy of every attention layer of a DCPGPT2LMHeadModel (None clears it).

    Dense models built as DCPGPT2LMHeadModel with dcp_enabled=False accept a policy too.
    """
    layers = getattr(model, "dcp_layers", None)
    if layers is None:
        raise TypeError(
            f"apply_keep_policy needs a DCPGPT2LMHeadModel, got {type(model).__name__}. Convert a dense "
            "GPT-2 with DCPGPT2LMHeadModel.from_dense(model, dcp_enabled=False)."
        )
    for layer in layers:
        layer.keep_policy = policy
