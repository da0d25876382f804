"""``Adagrad``: torch's class with the update step dispatched to recap_kernels' backends."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _device_dtype_check_for_fused

from recap_kernels.optim._dispatch import FusedStepMixin, new_step


class Adagrad(FusedStepMixin, torch.optim.Adagrad):
    """``torch.optim.Adagrad`` whose update runs on recap_kernels' fused kernels.

    Same arguments, state layout (``step``, ``sum``), ``state_dict`` and numbers as
    ``torch.optim.Adagrad``, dense and sparse gradients alike; ``backend`` as for
    :class:`recap_kernels.optim.Adam`.
    """

    _kind = "adagrad"

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
    ) -> None:
        self._setup_backend(backend)
        super().__init__(
            params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, foreach,
            maximize=maximize, differentiable=differentiable, fused=fused,
        )
        # torch creates Adagrad's state eagerly, with ``step`` on the host unless fused.
        self._normalize_state()

    def _check_param(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> None:
        # The errors torch.optim.Adagrad raises mid-step, raised here before anything changes.
        if group["fused"]:
            if not self.state.get(p):
                _device_dtype_check_for_fused(p)
            if grad.is_sparse or torch.is_complex(p):
                raise RuntimeError("`fused` does not support sparse grad or complex param")
            if group["differentiable"]:
                raise RuntimeError("adagrad with fused=True does not support differentiable=True")
        if grad.is_sparse and group["weight_decay"] != 0:
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")

    def _new_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Tensor]:
        # Parameters added after construction start from the optimizer's *default*
        # initial_accumulator_value, not their group's: torch.optim.Adagrad does this, and a
        # drop-in must produce the same numbers.
        init = self.defaults["initial_accumulator_value"]
        if torch.is_complex(p):
            init = complex(init, init)
        return {"step": new_step(p, on_device=self._step_on_device(group, p)),
                "sum": torch.full_like(p, init, memory_format=torch.preserve_format)}

    def step(self, closure=None):
        """Perform a single optimization step: one fused update per bucket of tensors.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        return self._fused_step(closure)
