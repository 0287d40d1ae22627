"""A noise level that sets itself from the generalisation gap: :class:`NoiseOnGap`."""

from __future__ import annotations

import math
from typing import Any

from lightning_mk.settings import is_number

__all__ = ["NoiseOnGap"]


def _fraction(name: str, value: Any, top: float = 1.0) -> float:
    if not is_number(value) or not 0 < value <= top:
        raise ValueError(f"{name} must be a number in (0, {top:g}], got {value!r}")
    return float(value)


class NoiseOnGap:
    """The noise level of the draws, steered by the gap between the training and the validation loss.

    Majority Kernels regularise (the copies' spread puts a curvature penalty on the deployed kernel), and a
    regulariser helps only where the model overfits. So the level starts at zero (under ``form="decoupled"``
    or ``"relative"``, plain training) and, at each validation, moves by ``step * ceiling``: up while the
    training loss is below ``ratio`` times the validation loss (the model fits its training data much better
    than it generalises), down while it is above (it underfits, or does not overfit), within ``[0, ceiling]``.
    The training loss is the sampled model's, which includes the penalty: the level settles where the penalty
    holds the training loss at ``ratio`` times the validation loss. Call :meth:`update` with the mean training
    loss since the last validation and the validation loss; :attr:`level` is the noise to train with.
    """

    def __init__(self, ceiling: float = 0.3, step: float = 0.1, ratio: float = 0.5) -> None:
        if not is_number(ceiling) or not 0 < ceiling < math.inf:
            raise ValueError(f"the noise ceiling must be a number > 0, got {ceiling!r}")
        self.ceiling = float(ceiling)
        self.step = _fraction("step", step)
        self.ratio = _fraction("ratio", ratio)
        self.level = 0.0
        self.updates = 0

    def update(self, train_loss: float, val_loss: float) -> float:
        """Take the mean training loss since the last validation and the validation loss; return the new level.
        A non-finite loss lowers the level."""
        self.updates += 1
        overfits = math.isfinite(train_loss) and math.isfinite(val_loss) and train_loss < self.ratio * val_loss
        move = self.step * self.ceiling * (1 if overfits else -1)
        self.level = min(self.ceiling, max(0.0, self.level + move))
        return self.level

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.level, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.level, self.updates = float(state["level"]), int(state["updates"])
