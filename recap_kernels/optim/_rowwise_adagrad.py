"""``RowWiseAdagrad``: Adagrad with one accumulator per embedding row, dense and sparse gradients.

A drop-in for ``torchrec.optim.RowWiseAdagrad``: the same arguments and the same state (``step``,
and ``sum`` of shape ``(rows, 1)`` in the parameter's dtype), so checkpoints move between the two.
The numbers are those of FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` (what torchrec's sharded embedding
tables train with), for every row with a gradient ``g``::

    step += 1;  clr = lr / (1 + (step - 1) * lr_decay)
    g += weight_decay * w                    (L2; only rows with a gradient)
    sum += mean(g * g)                       (over the row)
    w -= clr * g / (sqrt(sum) + eps)

Note [Row-wise Adagrad numbers]
torchrec's own Python ``RowWiseAdagrad`` computes something else: it squares the row mean of the
gradient (``sum += mean(g)**2``) and moves every element of a row by that mean, and it fails with
weight decay (a full-size tensor added into the ``(rows, 1)`` accumulator). Its docstring promises
the FBGEMM behaviour, which is what this class computes; ``tests/reference.py`` holds the float64
reference every backend is checked against. Sparse gradients (torchrec's raises on them) update
only the rows present, duplicates summed first, as FBGEMM's backward does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from recap_kernels.backends._base import is_dtensor
from recap_kernels.optim._dispatch import FusedStepMixin, new_step


class RowWiseAdagrad(FusedStepMixin, torch.optim.Optimizer):
    """Row-wise Adagrad for 2-D embedding tables ``(rows, dim)``, on recap_kernels' kernels.

    Args:
        params: parameters or param groups; every parameter is 2-D.
        lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize: as
            ``torchrec.optim.RowWiseAdagrad`` (and ``torch.optim.Adagrad``).
        backend: ``"auto"`` or a backend name, as for :class:`recap_kernels.optim.Adam`.
    """

    _kind = "rowwise_adagrad"

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        maximize: bool = False,
        backend: str = "auto",
    ) -> None:
        # torchrec's checks and messages.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        self._setup_backend(backend)
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, maximize=maximize)
        super().__init__(params, defaults)
        # State exists from the start, as torchrec creates it.
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = self._new_state(group, p)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for p in ([param_group["params"]] if isinstance(param_group["params"], Tensor) else param_group["params"]):
            if isinstance(p, Tensor) and p.dim() != 2:
                raise ValueError(f"RowWiseAdagrad updates 2-D embedding tables (rows, dim), not a parameter of shape "
                                 f"{tuple(p.shape)}")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    def _check_param(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> None:
        if grad.is_sparse and grad.sparse_dim() != 1:
            raise RuntimeError(f"RowWiseAdagrad takes sparse gradients of whole rows (sparse_dim 1, as "
                               f"nn.EmbeddingBag(sparse=True) makes them), not sparse_dim {grad.sparse_dim()}")
        if torch.is_complex(p):
            raise RuntimeError("RowWiseAdagrad does not support complex parameters")

    def _state_shape(self, p: Tensor) -> torch.Size:
        return torch.Size((p.shape[0], 1))

    def _new_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Tensor]:
        # Parameters added after construction start from the optimizer's default
        # initial_accumulator_value, as torch.optim.Adagrad's do.
        init = float(self.defaults["initial_accumulator_value"])
        if is_dtensor(p):  # a DTensor sharded as its table (FSDP2 shards rows: Note [Sharded parameters])
            from torch.distributed.tensor import full

            total = full(self._state_shape(p), init, dtype=p.dtype, device_mesh=p.device_mesh,
                         placements=p.placements)
        else:
            total = torch.full(self._state_shape(p), init, dtype=p.dtype, device=p.device)
        return {"step": new_step(p, on_device=self._step_on_device(group, p)), "sum": total}

    def step(self, closure=None):
        """Perform a single optimization step: one fused update per bucket of tables.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        return self._fused_step(closure)
