"""``Adam`` and ``AdamW``: torch's classes with the update step dispatched to recap_kernels' backends."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _device_dtype_check_for_fused, _get_capturable_supported_devices

from recap_kernels.optim._dispatch import FusedStepMixin, new_step


class _AdamStep(FusedStepMixin):
    _kind = "adam"

    def _check_param(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> None:
        # The errors torch.optim.Adam raises mid-step, raised here before anything changes.
        if grad.is_sparse:  # torch's message, plus which parameter (an embedding table left in an Adam group)
            group_name = f" in param group {group['name']!r}" if "name" in group else ""
            raise RuntimeError(f"Adam does not support sparse gradients, please consider SparseAdam instead: a "
                               f"parameter of shape {tuple(p.shape)}{group_name} has a sparse gradient")
        state = self.state.get(p)
        if not state and group["fused"]:
            _device_dtype_check_for_fused(p)
        if group["foreach"] and torch.is_tensor(group["lr"]) and not group["capturable"]:
            raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if group["capturable"] and not torch.compiler.is_compiling():
            devices = _get_capturable_supported_devices()
            if p.device.type not in devices:
                raise AssertionError(
                    f"If capturable=True, params and state_steps must be on supported devices: {devices}."
                )
        if state and group["differentiable"] and state["step"].requires_grad:
            raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")

    def _new_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Tensor]:
        state = {
            "step": new_step(p, on_device=self._step_on_device(group, p)),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def step(self, closure=None):
        """Perform a single optimization step: one fused update per bucket of tensors.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        return self._fused_step(closure)


class Adam(_AdamStep, torch.optim.Adam):
    """``torch.optim.Adam`` whose update runs on recap_kernels' fused kernels.

    Same arguments, state layout, ``state_dict`` and numbers as ``torch.optim.Adam``; the swap is
    ``from recap_kernels import optim`` then ``optim.Adam(model.parameters(), lr=1e-3)``.

    Args:
        backend: ``"auto"`` (default: the fastest backend that can run each bucket of tensors,
            or ``$RECAP_KERNELS_BACKEND`` when set), or one of ``"torch"``, ``"triton"``, ``"cuda"``,
            ``"cpu"``, which must then be able to run, else the step raises
            :class:`recap_kernels.BackendUnavailableError` saying why.

    All other arguments are ``torch.optim.Adam``'s.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
    ) -> None:
        self._setup_backend(backend)
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )


class AdamW(_AdamStep, torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled weight decay) whose update runs on recap_kernels' fused kernels.

    Same arguments, state layout, ``state_dict`` and numbers as ``torch.optim.AdamW``, plus
    ``backend`` as for :class:`Adam`.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
    ) -> None:
        self._setup_backend(backend)
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable, fused=fused,
        )
