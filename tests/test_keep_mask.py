"""Tests for the keep mask, the attention bias built from it and the sparsity statistics.

The keep probability of token j for query k >= j is I[k, j] = prod_{n=j+1..k} p[n, j] with
p = sparse_sigmoid(s, alpha). Only real (non-padding) queries n drop tokens. In hard mode
(alpha = inf) token j is dropped for query k iff some real query n with j < n <= k has s[n, j] <= 0.
Statistics count the valid pairs j < k of real tokens, without the last real query of each row,
which predicts nothing.
"""

import math

import pytest
import torch

from src.dcp.keep_mask import (
    LOG_KEEP_FLOOR,
    attention_bias,
    interaction_scores,
    keep_stats,
    log_keep_mask,
    valid_pairs,
)
from src.dcp.sparse_sigmoid import sparse_sigmoid

SOFT_ALPHAS = [1.0, 1.5, 2.0, 8.0]


def random_scores(batch: int, length: int, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, length, generator=generator) * scale


def padding_mask(real_spans: list[tuple[int, int]], length: int) -> torch.Tensor:
    """Return key_valid (B, T): row b is real on [start, end) of real_spans[b] and padding elsewhere."""
    key_valid = torch.zeros(len(real_spans), length, dtype=torch.bool)
    for row, (start, end) in enumerate(real_spans):
        key_valid[row, start:end] = True
    return key_valid


def reference_keep(p: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Return I (B, T, T) for j <= k as explicit products over the dropping queries, and 0 above the diagonal."""
    batch, length, _ = p.shape
    keep = torch.zeros(batch, length, length, dtype=torch.float64)
    for b in range(batch):
        for k in range(length):
            for j in range(k + 1):
                product = 1.0
                for n in range(j + 1, k + 1):
                    if key_valid is None or key_valid[b, n]:
                        product *= float(p[b, n, j])
                keep[b, k, j] = product
    return keep


def reference_hard_keep(scores: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Return the hard keep mask (B, T, T) bool for j <= k by the drop rule, and False above the diagonal."""
    batch, length, _ = scores.shape
    keep = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        for k in range(length):
            for j in range(k + 1):
                dropped = any(
                    scores[b, n, j] <= 0 for n in range(j + 1, k + 1) if key_valid is None or key_valid[b, n]
                )
                keep[b, k, j] = not dropped
    return keep


def lower_triangle(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()


def test_interaction_scores_formula():
    generator = torch.Generator().manual_seed(0)
    q_int = torch.randn(2, 5, 8, generator=generator).to(torch.bfloat16)
    k_int = torch.randn(2, 5, 8, generator=generator).to(torch.bfloat16)
    beta = torch.tensor(0.75)

    scores = interaction_scores(q_int, k_int, beta)

    expected = q_int.double() @ k_int.double().transpose(-1, -2) / math.sqrt(8) + 0.75
    assert scores.dtype == torch.float32
    assert scores.shape == (2, 5, 5)
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("alpha", SOFT_ALPHAS)
def test_soft_mask_matches_loop(alpha):
    scores = random_scores(2, 12)
    p = sparse_sigmoid(scores.double(), alpha)
    expected = reference_keep(p)

    log_keep = log_keep_mask(scores, alpha)

    assert log_keep.dtype == torch.float32
    assert log_keep.shape == (2, 12, 12)
    lower = lower_triangle(12).expand_as(log_keep)
    torch.testing.assert_close(log_keep.exp()[lower].double(), expected[lower], rtol=1e-4, atol=1e-6)


def test_soft_mask_matches_loop_in_log_space():
    # With alpha = 1 no probability is 0, so log I is finite everywhere and can be compared directly.
    scores = random_scores(2, 12)
    expected = reference_keep(torch.sigmoid(scores.double())).log()

    log_keep = log_keep_mask(scores, 1.0)

    lower = lower_triangle(12).expand_as(log_keep)
    torch.testing.assert_close(log_keep[lower].double(), expected[lower], rtol=1e-5, atol=1e-5)


def test_soft_mask_with_padding_matches_loop():
    scores = random_scores(3, 10, seed=1)
    key_valid = padding_mask([(3, 10), (0, 7), (2, 8)], 10)
    p = sparse_sigmoid(scores.double(), 1.5)
    expected = reference_keep(p, key_valid)

    log_keep = log_keep_mask(scores, 1.5, key_valid)

    lower = lower_triangle(10).expand_as(log_keep)
    torch.testing.assert_close(log_keep.exp()[lower].double(), expected[lower], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("with_padding", [False, True])
def test_hard_mask_matches_loop(with_padding):
    scores = random_scores(3, 12, seed=2) + 1.0  # mostly positive, so drops are neither rare nor total
    key_valid = padding_mask([(3, 12), (0, 9), (0, 12)], 12) if with_padding else None
    keep = reference_hard_keep(scores, key_valid)

    log_keep = log_keep_mask(scores, math.inf, key_valid)

    lower = lower_triangle(12).expand_as(log_keep)
    expected = torch.where(keep, 0.0, LOG_KEEP_FLOOR)
    assert torch.equal(log_keep[lower], expected[lower])
    dropped = int((~keep & lower).sum())
    assert 0 < dropped < int(lower.sum()) - 3 * 12, "the scores should drop some but not all tokens"


@pytest.mark.parametrize("alpha", [*SOFT_ALPHAS, math.inf])
def test_mask_non_increasing_down_queries(alpha):
    scores = random_scores(3, 16, seed=3) + 0.5
    key_valid = padding_mask([(0, 16), (4, 16), (0, 11)], 16)

    for valid in (None, key_valid):
        log_keep = log_keep_mask(scores, alpha, valid)
        # log I[k + 1, j] <= log I[k, j] for every j: a dropped token stays dropped.
        increase = (log_keep[:, 1:, :] - log_keep[:, :-1, :]).max()
        assert increase <= 0, f"log I grows down the query axis by {increase}"


@pytest.mark.parametrize("alpha", [*SOFT_ALPHAS, math.inf])
def test_self_never_dropped(alpha):
    scores = torch.full((2, 20, 20), -50.0)
    key_valid = padding_mask([(0, 20), (5, 17)], 20)

    for valid in (None, key_valid):
        log_keep = log_keep_mask(scores, alpha, valid)
        assert torch.equal(log_keep.diagonal(dim1=-2, dim2=-1), torch.zeros(2, 20))


@pytest.mark.parametrize("alpha", [*SOFT_ALPHAS, math.inf])
def test_mask_floor_is_finite(alpha):
    # 240 rows of -50 scores push log I far below the floor for soft alphas with p = 0 or p ~ 1e-22.
    log_keep = log_keep_mask(torch.full((1, 240, 240), -50.0), alpha)

    assert torch.isfinite(log_keep).all()
    assert log_keep.min() >= LOG_KEEP_FLOOR
    assert log_keep[0, -1, 0] == LOG_KEEP_FLOOR


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [1.0, 1.5, 8.0, math.inf])
def test_attention_rows_finite_with_near_zero_keep(dtype, alpha):
    batch, heads, length = 3, 2, 240
    key_valid = padding_mask([(0, length), (7, length), (0, length - 9)], length)
    log_keep = log_keep_mask(torch.full((batch, length, length), -50.0), alpha, key_valid)
    generator = torch.Generator().manual_seed(4)
    logits = (torch.randn(batch, heads, length, length, generator=generator) * 4).to(dtype)

    bias = attention_bias(log_keep, key_valid, dtype)
    weights = torch.softmax(logits + bias, dim=-1)

    assert bias.dtype == dtype
    assert bias.shape == (batch, 1, length, length)
    assert torch.isfinite(bias).all()
    assert torch.isfinite(weights).all()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(weights.float().sum(-1), torch.ones(batch, heads, length), rtol=0, atol=tolerance)

    # Future keys, padding keys of real queries and tokens at the floor get exactly zero weight.
    future = ~lower_triangle(length)
    assert (weights[..., future] == 0).all()
    real_query_padding_key = key_valid[:, None, :, None] & ~key_valid[:, None, None, :]
    assert (weights.masked_select(real_query_padding_key) == 0).all()
    floored = (log_keep <= LOG_KEEP_FLOOR)[:, None].expand_as(weights)
    assert (weights[floored] == 0).all()


def test_attention_bias_values():
    length = 6
    key_valid = padding_mask([(2, 6), (0, 4)], length)
    log_keep = -torch.rand(2, length, length)

    bias = attention_bias(log_keep, key_valid, torch.float32)[:, 0]

    minimum = torch.finfo(torch.float32).min
    for b in range(2):
        for k in range(length):
            for j in range(length):
                allowed = (j <= k and bool(key_valid[b, j])) or j == k
                expected = float(log_keep[b, k, j]) if allowed else minimum
                assert bias[b, k, j].item() == expected, f"bias[{b}, {k}, {j}]"


def test_valid_pairs_hand_count():
    key_valid = padding_mask([(2, 6), (0, 4), (0, 6), (3, 4), (0, 0)], 6)

    pairs = valid_pairs(key_valid)

    expected = {
        # Left padding: real tokens 2..5, queries 2..4 count (5 is the last real token).
        0: {(3, 2), (4, 2), (4, 3)},
        # Right padding: real tokens 0..3, queries 0..2 count.
        1: {(1, 0), (2, 0), (2, 1)},
        # No padding: queries 0..4 count.
        2: {(k, j) for k in range(5) for j in range(k)},
        # One real token and an empty row have no pairs.
        3: set(),
        4: set(),
    }
    for row, row_pairs in expected.items():
        found = {(k, j) for k, j in pairs[row].nonzero().tolist()}
        assert found == row_pairs, f"row {row}"


def test_keep_fraction_hand_count():
    # Five real tokens, every score positive except s[2, 0]: token 0 is dropped for queries 2, 3, 4.
    scores = torch.ones(1, 5, 5)
    scores[0, 2, 0] = -1.0
    key_valid = torch.ones(1, 5, dtype=torch.bool)

    stats = keep_stats(log_keep_mask(scores, math.inf, key_valid), key_valid)

    # Valid pairs: queries 1..3 (4 is the last), j < k: (1,0) (2,0) (2,1) (3,0) (3,1) (3,2).
    # Dropped among them: (2,0) and (3,0).
    assert stats.pair_count.item() == 6
    assert stats.keep_sum.item() == 4.0
    assert stats.keep_fraction.item() == pytest.approx(4 / 6)


def test_soft_keep_sum_matches_loop():
    scores = random_scores(2, 9, seed=5)
    key_valid = padding_mask([(0, 9), (3, 9)], 9)
    expected_keep = reference_keep(sparse_sigmoid(scores.double(), 1.5), key_valid)

    stats = keep_stats(log_keep_mask(scores, 1.5, key_valid), key_valid)

    pairs = valid_pairs(key_valid)
    assert stats.pair_count.item() == int(pairs.sum()) == 28 + 10
    assert stats.keep_sum.item() == pytest.approx(expected_keep[pairs].sum().item(), rel=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 1.5, math.inf])
def test_padding_leaves_real_tokens_unchanged(alpha):
    real_length, left, right = 8, 3, 2
    length = left + real_length + right
    real_scores = random_scores(1, real_length, seed=6)
    real_valid = torch.ones(1, real_length, dtype=torch.bool)

    # Padding rows and columns get scores of -50, which would drop every real token if they counted.
    scores = torch.full((1, length, length), -50.0)
    scores[:, left : left + real_length, left : left + real_length] = real_scores
    key_valid = padding_mask([(left, left + real_length)], length)

    real_log_keep = log_keep_mask(real_scores, alpha, real_valid)
    padded_log_keep = log_keep_mask(scores, alpha, key_valid)
    real_stats = keep_stats(real_log_keep, real_valid)
    padded_stats = keep_stats(padded_log_keep, key_valid)

    block = padded_log_keep[:, left : left + real_length, left : left + real_length]
    torch.testing.assert_close(block, real_log_keep, rtol=0, atol=1e-6)
    assert padded_stats.pair_count.item() == real_stats.pair_count.item()
    assert padded_stats.keep_sum.item() == pytest.approx(real_stats.keep_sum.item(), rel=1e-6)


def test_soft_stats_carry_gradient():
    scores = random_scores(1, 8, seed=7).requires_grad_()
    key_valid = torch.ones(1, 8, dtype=torch.bool)

    stats = keep_stats(log_keep_mask(scores, 1.5, key_valid), key_valid)
    stats.keep_fraction.backward()

    assert torch.isfinite(scores.grad).all()
    assert scores.grad.abs().sum() > 0
