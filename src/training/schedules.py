"""The alpha schedule of the sparse sigmoid and the controller that sets the sparsity weight.

Neither depends on Lightning, so both are unit-tested on their own and their state is plain numbers
that go into checkpoints.
"""

import math
from dataclasses import dataclass


def cosine_alpha(step: int, total_steps: int, start: float = 1.0 + 1e-4, end: float = 8.0) -> float:
    """Return alpha at `step`: cosine from `start` to `end` over `total_steps`, then held at `end`.

    alpha is a per-step value (logged as a metric, not a parameter).
    """
    if total_steps <= 0 or step >= total_steps:
        return end
    progress = max(step, 0) / total_steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class SparsityController:
    """Weight of the keep-fraction term in the loss, adapted so that measured sparsity meets a target.

    The loss is `cross_entropy + weight * keep_fraction`. In "adaptive" mode the weight is a Lagrange
    multiplier of the constraint keep_fraction <= 1 - target: each step it grows by
    `lr * (measured_keep - (1 - target))`, where `measured_keep` is an exponential moving average of
    the keep fraction of the training batches, and `gain` adds a proportional term.
    The weight may become negative: a model that drops more than the target without any
    regularisation is pushed back towards keeping context. In "fixed" mode the weight is `gamma` (the
    reference recipe uses 0.3 with the keep fraction normalised over valid pairs).
    """

    target_sparsity: float
    mode: str = "adaptive"
    gamma: float = 0.3
    lr: float = 0.01
    gain: float = 5.0
    ema: float = 0.0
    integral: float = 0.0
    measured_keep: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(
                f"target sparsity must be in [0, 1), got {self.target_sparsity}; "
                "0 keeps all context (dense), 0.8 drops 80% of context pairs"
            )
        if self.mode not in ("adaptive", "fixed"):
            raise ValueError(f"unknown regulariser mode {self.mode!r}; use 'adaptive' or 'fixed'")

    @property
    def gap(self) -> float:
        """Measured keep fraction minus the allowed one (positive: too little dropped)."""
        if self.measured_keep is None:
            return 0.0
        return self.measured_keep - (1.0 - self.target_sparsity)

    @property
    def weight(self) -> float:
        if self.mode == "fixed":
            return self.gamma
        return self.integral + self.gain * self.gap

    def update(self, keep_fraction: float) -> None:
        """Fold one training batch's keep fraction into the average and step the multiplier."""
        if self.measured_keep is None:
            self.measured_keep = keep_fraction
        else:
            self.measured_keep = self.ema * self.measured_keep + (1.0 - self.ema) * keep_fraction
        if self.mode == "adaptive":
            self.integral += self.lr * self.gap

    def state_dict(self) -> dict:
        return {"integral": self.integral, "measured_keep": self.measured_keep}

    def load_state_dict(self, state: dict) -> None:
        self.integral = float(state["integral"])
        self.measured_keep = state["measured_keep"]
