"""Tests for the sparse sigmoid against a high-precision entmax reference.

sigma_alpha(s) is the first coordinate of alpha-entmax applied to [s, 0]. For a = alpha - 1 > 0 it
is the p in [0, 1] that solves (p^a - (1 - p)^a) / a = s, clipped to exactly 0 or 1 outside the band
|s| < 1/a. alpha = 1 is the logistic sigmoid, alpha = 2 is clip((s + 1) / 2, 0, 1) and alpha = inf is
the hard step 1[s > 0].
"""

import math

import mpmath
import pytest
import torch

from src.dcp.sparse_sigmoid import sparse_sigmoid

# 1 + 1e-5 lies just above the switch to the logistic sigmoid, and 8 ends the training schedule.
ALPHAS = [1.0 + 1e-5, 1.2, 1.5, 1.7, 2.0, 2.5, 3.0, 5.0, 8.0]

# Positions inside the band, as fractions of 1/a. The last ones probe the band edge, where for
# alpha < 2 p approaches 1 like 1 - (1 - a s)^(1/a), a curve that linear interpolation fits poorly.
BAND_FRACTIONS = [0.0, 1e-6, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 0.9999, 1 - 1e-5, 1 - 1e-6, 1 - 1e-7]

# Absolute scores that matter when the band is wide (alpha near 1, where 1/a is up to 1e5).
ABSOLUTE_SCORES = [0.3, 1.0, 3.0, 10.0, 30.0]

# Largest score magnitude in the accuracy and monotonicity grids. Larger float32 scores at alpha
# near 1 have their own test below.
MAX_GRID_SCORE = 30.0

# Alphas of the monotonicity tests.
MONOTONE_ALPHAS = [1.0 + 1e-5, 1.5, 1.7, 2.0, 3.0, 8.0]
# Float32 input takes one Newton step, whose rounding may lower p by about 1e-6 between adjacent
# scores; float64 input is solved by bisection.
MONOTONE_TOLERANCE = {torch.float32: 2e-6, torch.float64: 0.0}

def reference_sparse_sigmoid(s: float, alpha: float) -> float:
    """Solve (p^a - (1 - p)^a) / a = s by bisection in 50-digit arithmetic."""
    with mpmath.workdps(50):
        a = mpmath.mpf(alpha) - 1
        s = mpmath.mpf(s)
        if s >= 1 / a:
            return 1.0
        if s <= -1 / a:
            return 0.0

        def g(p):
            return (p**a - (1 - p) ** a) / a

        low, high = mpmath.mpf(0), mpmath.mpf(1)
        for _ in range(80):  # 2^-80: far below float64 resolution
            mid = (low + high) / 2
            if g(mid) < s:
                low = mid
            else:
                high = mid
        return float((low + high) / 2)


def reference_scores(alpha: float) -> list[float]:
    """Return scores on both sides of 0 that cover the band of alpha and its edges."""
    band = 1.0 / (alpha - 1.0)
    magnitudes = [fraction * band for fraction in BAND_FRACTIONS]
    magnitudes += [value for value in ABSOLUTE_SCORES if value < band]
    magnitudes += [band * 1.5]
    magnitudes = [value for value in magnitudes if value <= MAX_GRID_SCORE]
    return sorted({sign * value for value in magnitudes for sign in (1.0, -1.0)})


def assert_matches_reference(s: torch.Tensor, alpha: float, tolerance: float) -> None:
    # The reference is evaluated at the score the tensor holds, after rounding to its dtype.
    expected = torch.tensor([reference_sparse_sigmoid(float(value), alpha) for value in s], dtype=torch.float64)

    p = sparse_sigmoid(s, alpha)

    assert p.dtype == s.dtype
    error = (p.double() - expected).abs()
    worst = int(error.nan_to_num(math.inf).argmax())
    assert not error.isnan().any(), f"alpha={alpha}: NaN at s={s[error.isnan()].tolist()}"
    assert error.max() <= tolerance, f"alpha={alpha}: |error| {error.max():.3g} at s={s[worst].item()!r}"


def reference_cases():
    for alpha in ALPHAS:
        yield pytest.param(alpha, torch.float32, 1e-5, id=f"float32-{alpha}")
        yield pytest.param(alpha, torch.float64, 1e-10, id=f"float64-{alpha}")


@pytest.mark.parametrize(("alpha", "dtype", "tolerance"), list(reference_cases()))
def test_matches_high_precision_reference(alpha, dtype, tolerance):
    s = torch.tensor(reference_scores(alpha), dtype=dtype)
    assert_matches_reference(s, alpha, tolerance)


def consecutive_floats(start: float, count: int, dtype: torch.dtype, toward_zero: bool) -> torch.Tensor:
    """Return `count` adjacent representable values of dtype, from `start` toward or away from 0.

    Adjacent non-negative floats have adjacent bit patterns, so the walk steps the integer view of
    |start| and restores the sign. A start of 0 walks away from it, into the positive subnormals.
    """
    integer_dtype = {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    magnitude_bits = torch.tensor(abs(start), dtype=dtype).view(integer_dtype)
    offsets = torch.arange(count, dtype=integer_dtype)
    bits = magnitude_bits - offsets if toward_zero else magnitude_bits + offsets
    return bits.view(dtype) * (-1.0 if start < 0 else 1.0)


def monotone_grid(alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """Return a sorted fine grid over the band plus runs of adjacent floats at its edges and at 0."""
    band = 1.0 / (alpha - 1.0)
    edge = min(band, MAX_GRID_SCORE)
    grid = torch.linspace(-1.1 * edge, 1.1 * edge, 20_001, dtype=dtype)

    runs = [
        consecutive_floats(edge, 2000, dtype, toward_zero=True),
        consecutive_floats(-edge, 2000, dtype, toward_zero=True),
        consecutive_floats(0.5 * edge, 2000, dtype, toward_zero=False),
        consecutive_floats(0.0, 2000, dtype, toward_zero=False),
        -consecutive_floats(0.0, 2000, dtype, toward_zero=False),
    ]
    return torch.cat([grid, *runs]).sort().values


def largest_drop(s: torch.Tensor, alpha: float) -> tuple[float, str]:
    """Return the largest decrease of p between adjacent scores of the sorted s, and where it is."""
    p = sparse_sigmoid(s, alpha)
    assert not p.isnan().any(), f"alpha={alpha}: NaN at s={s[p.isnan()][:4].tolist()}"

    steps = p[1:] - p[:-1]
    worst = int(steps.argmin())
    before, after = worst, worst + 1
    where = (
        f"alpha={alpha}: p({s[before].item()!r}) = {p[before].item()!r} "
        f"> p({s[after].item()!r}) = {p[after].item()!r}"
    )
    return -steps.min().item(), where


def monotone_cases():
    for dtype in (torch.float32, torch.float64):
        for alpha in MONOTONE_ALPHAS:
            yield pytest.param(alpha, dtype, id=f"{str(dtype).removeprefix('torch.')}-{alpha}")


@pytest.mark.parametrize(("alpha", "dtype"), list(monotone_cases()))
def test_monotone_up_to_rounding(alpha, dtype):
    # Errors far below the accuracy tolerance may still reorder neighbours: allow drops of 2e-6
    # (float32, 16 units in the last place at 1) and 1e-13 (float64).
    tolerance = MONOTONE_TOLERANCE[dtype]

    drop, where = largest_drop(monotone_grid(alpha, dtype), alpha)

    assert drop <= tolerance, where


def test_monotone_exactly_in_float64():
    # Float64 input is solved by bisection, which is monotone by construction.
    for alpha in MONOTONE_ALPHAS:
        drop, where = largest_drop(monotone_grid(alpha, torch.float64), alpha)
        assert drop <= 0, where


def test_finite_at_band_edge():
    # The 64 float32 scores just inside the band edge 1/7 of alpha = 8, on both sides of 0.
    s = consecutive_floats(1.0 / 7.0, 64, torch.float32, toward_zero=True)
    s = s[s < 1.0 / 7.0]
    s = torch.cat([s, -s])

    assert_matches_reference(s, 8.0, 1e-5)


@pytest.mark.parametrize("alpha", [1.0 + 1e-5, 1.01])
def test_float32_scores_beyond_table(alpha):
    s = torch.tensor([41.0, 1e3, 1e4, -41.0, -1e3], dtype=torch.float32)
    assert_matches_reference(s, alpha, 1e-5)


@pytest.mark.parametrize("alpha", [1.0 + 1e-5, 1.01])
def test_float64_scores_beyond_table(alpha):
    s = torch.tensor([41.0, 1e3, 1e4, -41.0, -1e3], dtype=torch.float64)
    assert_matches_reference(s, alpha, 1e-10)


@pytest.mark.parametrize("alpha", [1.0, 1.0 + 1e-5, 1.3, 1.5, 2.0, 3.0, 8.0])
def test_gradcheck_inside_band(alpha):
    torch.manual_seed(0)
    # Points inside the band, at most 0.8 of the way to its edge (for alpha = 1 the band is unbounded).
    half_width = 4.0 if alpha - 1.0 < 0.25 else 0.8 / (alpha - 1.0)
    s = ((torch.rand(12, dtype=torch.float64) * 2 - 1) * half_width).requires_grad_()

    assert torch.autograd.gradcheck(lambda x: sparse_sigmoid(x, alpha), (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0, 8.0])
def test_zero_gradient_outside_band(alpha):
    band = 1.0 / (alpha - 1.0)
    s = torch.tensor([band, 1.01 * band, 2 * band, 10 * band], dtype=torch.float64)
    s = torch.cat([s, -s]).requires_grad_()

    sparse_sigmoid(s, alpha).sum().backward()

    assert torch.equal(s.grad, torch.zeros_like(s))


def test_gradient_at_zero_matches_closed_form():
    # At s = 0, p = 1/2 and dp/ds = q1 q2 / (q1 + q2) with q1 = q2 = (1/2)^(2 - alpha), so (1/2)^(3 - alpha).
    for alpha in (1.0, 1.5, 2.0, 3.0, 8.0):
        s = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        sparse_sigmoid(s, alpha).sum().backward()
        assert s.grad.item() == pytest.approx(0.5 ** (3.0 - alpha), rel=1e-12), f"alpha={alpha}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_one_is_logistic_sigmoid(dtype):
    s = torch.linspace(-30, 30, 1001, dtype=dtype)
    torch.testing.assert_close(sparse_sigmoid(s, 1.0), torch.sigmoid(s), rtol=0, atol=1e-7)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_alpha_two_is_clipped_linear(dtype, tolerance):
    s = torch.linspace(-3, 3, 6001, dtype=dtype)
    expected = ((s + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(sparse_sigmoid(s, 2.0), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("alpha", [1.5, 1.7, 2.0, 3.0, 8.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_zero_and_one_outside_band(alpha, dtype):
    band = 1.0 / (alpha - 1.0)
    edge = torch.tensor(band, dtype=dtype)
    if edge.item() < band:
        # Rounding put the edge inside the band; the next representable score lies outside it.
        edge = torch.nextafter(edge, torch.tensor(math.inf, dtype=dtype))
    s = torch.stack([edge, edge * 1.001, edge * 3, torch.tensor(1e6, dtype=dtype)])

    assert torch.equal(sparse_sigmoid(s, alpha), torch.ones_like(s))
    assert torch.equal(sparse_sigmoid(-s, alpha), torch.zeros_like(s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_alpha_inf_is_hard_step(dtype):
    s = torch.tensor([-5.0, -1e-3, 0.0, 1e-3, 5.0], dtype=dtype)

    p = sparse_sigmoid(s, math.inf)

    assert p.dtype == dtype
    assert p.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("alpha", [0.999, 0.5, 0.0, -1.0, math.nan])
def test_alpha_below_one_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        sparse_sigmoid(torch.zeros(3), alpha)


def test_integer_scores_raise():
    with pytest.raises(TypeError, match="floating-point"):
        sparse_sigmoid(torch.zeros(3, dtype=torch.long), 1.5)


@pytest.mark.parametrize("alpha", [1.0, 1.0 + 1e-5, 1.5, 2.0, 3.0, 8.0])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_symmetry(alpha, dtype, tolerance):
    s = torch.linspace(0, 3, 3001, dtype=dtype)
    torch.testing.assert_close(sparse_sigmoid(-s, alpha), 1 - sparse_sigmoid(s, alpha), rtol=0, atol=tolerance)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 8.0, math.inf])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_input(alpha, dtype, tolerance):
    s = torch.linspace(-4, 4, 801).to(dtype)

    p = sparse_sigmoid(s, alpha)

    assert p.dtype == dtype
    assert torch.isfinite(p).all()
    # Compare with the fp32 result at the same (rounded) scores.
    torch.testing.assert_close(p.float(), sparse_sigmoid(s.float(), alpha), rtol=0, atol=tolerance)


def test_half_precision_backward():
    s = torch.linspace(-1, 1, 101, dtype=torch.bfloat16, requires_grad=True)

    sparse_sigmoid(s, 1.5).sum().backward()

    assert s.grad.dtype == torch.bfloat16
    assert torch.isfinite(s.grad).all()
    assert (s.grad > 0).all()
