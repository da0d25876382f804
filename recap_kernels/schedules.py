"""Learning-rate schedules of recap configs: :func:`compute_lr` and an ``LRScheduler`` over it.

Every schedule is a closed form of the step, so resuming at any step needs nothing but the step.
This module reads configs by attribute only and never imports pydantic: ``recap_kernels.compute_lr``
works on any object of :class:`recap_kernels.config.LearningRate`'s shape.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

if TYPE_CHECKING:
    from recap_kernels.config import LearningRate

__all__ = ["RecapLRScheduler", "compute_lr"]


def compute_lr(lr_config: LearningRate, step: int) -> float:
    """The learning rate of schedule ``lr_config`` at training step ``step`` (0-based).

    * ``constant``: the value.
    * ``piecewise_constant``: ``values[bisect_right(boundaries, step)]``; at a boundary step the
      next value already applies.
    * ``linear_ramp_to_constant``: ``min(lr, lr / num_ramp_steps * step)``, so 0 at step 0 and
      ``lr`` from ``num_ramp_steps`` on (from the start when ``num_ramp_steps`` is 0).
    * ``linear_ramp_to_cosine``: the same linear ramp below ``num_ramp_steps``, then a half cosine
      from ``learning_rate`` down to ``final_learning_rate`` at ``final_num_steps``, then
      ``final_learning_rate``.
    """
    if lr_config.constant is not None:
        return float(lr_config.constant)
    if (piecewise := lr_config.piecewise_constant) is not None:
        return float(piecewise.learning_rate_values[bisect_right(piecewise.learning_rate_boundaries, step)])
    if (ramp := lr_config.linear_ramp_to_constant) is not None:
        return _linear_ramp(ramp.learning_rate, ramp.num_ramp_steps, step)
    if (cosine := lr_config.linear_ramp_to_cosine) is not None:
        peak, final = cosine.learning_rate, cosine.final_learning_rate
        if step < cosine.num_ramp_steps:
            return _linear_ramp(peak, cosine.num_ramp_steps, step)
        if step >= cosine.final_num_steps:
            return float(final)
        progress = (step - cosine.num_ramp_steps) / (cosine.final_num_steps - cosine.num_ramp_steps)
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"no learning-rate schedule is set in {lr_config!r}")


def _linear_ramp(lr: float, num_ramp_steps: int, step: int) -> float:
    if num_ramp_steps == 0:
        return float(lr)
    return min(lr, lr / num_ramp_steps * step)


class RecapLRScheduler(LRScheduler):
    """Drives each param group of ``optimizer`` along its own recap schedule.

    Group ``i`` gets ``compute_lr(lr_configs[i], last_epoch)``: call ``step()`` once per training
    step, after ``optimizer.step()``. As with every ``LRScheduler``, construction sets the groups'
    learning rates for step 0.

    Args:
        optimizer: the optimizer whose ``param_groups`` are scheduled.
        lr_configs: one :class:`~recap_kernels.config.LearningRate` per param group, in group order.
        last_epoch: the last step taken, when resuming; -1 (default) starts afresh.
    """

    def __init__(self, optimizer: Optimizer, lr_configs: Sequence[LearningRate], last_epoch: int = -1) -> None:
        self.lr_configs = list(lr_configs)
        if len(self.lr_configs) != len(optimizer.param_groups):
            raise ValueError(
                f"{len(self.lr_configs)} learning-rate configs for {len(optimizer.param_groups)} param groups; "
                "give one per group"
            )
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        # A closed form needs no previous rate, so unlike chainable schedulers calling this outside step() is fine.
        return self._get_closed_form_lr()

    def _get_closed_form_lr(self) -> list[float]:
        return [compute_lr(cfg, self.last_epoch) for cfg in self.lr_configs]

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state, without ``lr_configs``: the schedules come from the config, not the checkpoint.

        This keeps checkpoints to plain data that ``torch.load(weights_only=True)`` accepts.
        """
        state = super().state_dict()
        del state["lr_configs"]
        return state
