"""The sparse sigmoid: the first coordinate of alpha-entmax applied to the pair [s, 0].

For alpha > 1 write a = alpha - 1. Alpha-entmax of z = [s, 0] is p_i = [a z_i - tau]_+^(1/a) with tau
chosen so that p_1 + p_2 = 1. Eliminating tau, p = p_1 solves

    g(p) = (p^a - (1 - p)^a) / a = s,

where g increases from -1/a at p = 0 to 1/a at p = 1. So p is exactly 0 for s <= -1/a, exactly 1 for
s >= 1/a, and strictly between inside the band |s| < 1/a. alpha = 1 is the logistic sigmoid (the limit
a -> 0), alpha = 2 gives clip((s + 1) / 2, 0, 1), and alpha = inf gives the hard step 1[s > 0].

Inside the band we solve g(p) = s for s >= 0 (p in [1/2, 1]) and use the symmetry p(-s) = 1 - p(s).
For each alpha a table of p on a uniform grid of s is solved exactly by bisection (cheap: the grid
is small). Each score then takes the table bracket that contains it, interpolates linearly and
refines with one float32 Newton step clamped to that bracket. Because p is monotone, brackets of
larger scores lie at or above those of smaller ones. Inside one bracket float32 rounding of the
Newton step can make p decrease by up to about 1e-6 between adjacent scores; float64 input is
solved by bisection and is monotone by construction. Only band elements are solved, so the cost
falls as alpha grows and scores leave the band.

The gradient is the entmax gradient, dp/ds = q_1 q_2 / (q_1 + q_2) with q_i = p_i^(2 - alpha) where
p_i > 0 and 0 elsewhere; it is 0 outside the band. It is evaluated as 1 / g'(p), which never overflows.
"""

import math

import torch

_BISECTION_STEPS = 60  # halvings of [1/2, 1]: below float64 resolution
_TABLE_SIZE = 2048  # grid intervals over [0, min(1/a, _TABLE_MAX_SCORE)]
_NEWTON_STEPS = 1  # after interpolation, one step reaches float32 resolution
_TABLE_MAX_SCORE = 40.0  # for a near 0, p(40) = 1 - 4e-18, which is 1 in float64

# Below this a = alpha - 1 the entmax solution equals the logistic sigmoid to within 1e-7 for
# the scores that occur here (|s| < 30), and g(p) loses precision to cancellation.
_LOGISTIC_LIMIT = 1e-6


def _g(p: torch.Tensor, a: float) -> torch.Tensor:
    """Evaluate g(p) = (p^a - (1 - p)^a) / a without cancellation for small a or overflow for large a."""
    log_p = torch.log(p)
    log_q = torch.log1p(-p)
    log_ratio = a * (log_p - log_q)

    # When both powers are near 1, p^a - q^a = q^a * expm1(a * (log p - log q)) avoids cancellation.
    # Far from that (large a, p near 1) q^a underflows and expm1 overflows, so subtract directly.
    near = torch.exp(a * log_q) * torch.expm1(log_ratio.clamp(max=1.0))
    far = torch.exp(a * log_p) - torch.exp(a * log_q)
    value = torch.where(log_ratio <= 1.0, near, far) / a
    return torch.where(p >= 1.0, torch.full_like(p, 1.0 / a), value)


def _g_derivative(p: torch.Tensor, a: float) -> torch.Tensor:
    """Evaluate g'(p) = p^(a-1) + (1-p)^(a-1), which is +inf at p = 1 when a < 1."""
    return p ** (a - 1.0) + (1.0 - p) ** (a - 1.0)


def _bisect_upper_half(s: torch.Tensor, a: float) -> torch.Tensor:
    """Solve g(p) = s for p in [1/2, 1] and float64 scores 0 <= s <= 1/a by bisection."""
    low = torch.full_like(s, 0.5)
    high = torch.ones_like(s)

    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (low + high)
        below = _g(mid, a) < s
        low = torch.where(below, mid, low)
        high = torch.where(below, high, mid)

    return 0.5 * (low + high)


def _solve_upper_half(s: torch.Tensor, a: float) -> torch.Tensor:
    """Solve g(p) = s for scores 0 <= s < 1/a: table bracket, interpolation, clamped Newton steps.

    The table is solved in float64 and the per-element work runs in float32. Float64 input is solved
    by bisection per element instead, for reference precision.
    """
    if s.dtype == torch.float64:
        # Reference precision (tests, gradcheck): bisection per element, monotone by construction.
        return _bisect_upper_half(s, a)

    work_dtype = torch.float32
    s_work = s.to(work_dtype)
    s_max = min(1.0 / a, _TABLE_MAX_SCORE)
    grid = torch.linspace(0.0, s_max, _TABLE_SIZE + 1, dtype=torch.float64, device=s.device)
    table = _bisect_upper_half(grid, a).to(work_dtype)  # (TABLE_SIZE + 1,)

    # Bracket [table[i], table[i + 1]] contains p(s) because p is monotone.
    position = (s_work * (_TABLE_SIZE / s_max)).clamp(0.0, float(_TABLE_SIZE))
    index = position.floor().long().clamp(max=_TABLE_SIZE - 1)
    low = table[index]
    high = table[index + 1]
    p = low + (position - index) * (high - low)

    for _ in range(_NEWTON_STEPS):
        step = (_g(p, a) - s_work) / _g_derivative(p, a)
        p = torch.minimum(torch.maximum(p - step, low), high)

    return p.to(s.dtype)


def sparse_sigmoid_forward(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """Compute sigma_alpha(s) elementwise, without autograd."""
    if math.isinf(alpha):
        return (s > 0).to(s.dtype)

    a = alpha - 1.0
    if a < _LOGISTIC_LIMIT:
        return torch.sigmoid(s)

    # Outside the band the answer is exactly 0 or 1.
    p = (s >= 0).to(s.dtype)
    band = s.abs() < 1.0 / a
    if s.is_cuda:
        # Boolean indexing would synchronise with the host; solve everywhere and select instead.
        s_clamped = s.abs().clamp(max=(1.0 / a) * (1 - 1e-7))
        p_upper = _solve_upper_half(s_clamped, a)
        return torch.where(band, torch.where(s >= 0, p_upper, 1.0 - p_upper), p)

    if not bool(band.any()):
        return p
    s_band = s[band]
    p_upper = _solve_upper_half(s_band.abs(), a)
    p[band] = torch.where(s_band >= 0, p_upper, 1.0 - p_upper)
    return p


def sparse_sigmoid_grad(p: torch.Tensor, alpha: float) -> torch.Tensor:
    """Return dp/ds of the sparse sigmoid, given its output p.

    dp/ds = 1 / g'(p) = 1 / (p^(alpha-2) + (1-p)^(alpha-2)) inside the band (0 < p < 1) and 0
    outside. This equals the entmax Jacobian q1 q2 / (q1 + q2) with q_i = p_i^(2 - alpha), written
    so that no power of a tiny p overflows: for alpha > 2 both powers are at most 1, and for alpha < 2
    a power that overflows to inf gives a gradient of exactly 0, its limit.
    """
    if math.isinf(alpha):
        return torch.zeros_like(p)

    q = 1.0 - p
    inside = (p > 0) & (q > 0)
    exponent = alpha - 2.0
    derivative = p.clamp_min(torch.finfo(p.dtype).tiny) ** exponent + q.clamp_min(torch.finfo(p.dtype).tiny) ** exponent
    return torch.where(inside, 1.0 / derivative, torch.zeros_like(p))


class _SparseSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: torch.Tensor, alpha: float) -> torch.Tensor:
        p = sparse_sigmoid_forward(s, alpha)
        ctx.save_for_backward(p)
        ctx.alpha = alpha
        return p

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (p,) = ctx.saved_tensors
        return grad_output * sparse_sigmoid_grad(p, ctx.alpha), None


def sparse_sigmoid(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """Apply the sparse sigmoid with entmax parameter alpha >= 1 (float('inf') is the hard step).

    Raises ValueError for alpha < 1, where alpha-entmax is not defined.
    """
    if not alpha >= 1.0:
        raise ValueError(f"alpha must be >= 1 (1 is the logistic sigmoid, inf the hard step), got {alpha}")
    if not s.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got dtype {s.dtype}")
    return _SparseSigmoid.apply(s, float(alpha))
