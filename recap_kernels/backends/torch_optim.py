"""The ``torch`` backend: stock ``torch.optim`` math, the reference every other backend matches.

Each param group's span of a bucket goes to torch's functional ``adam`` / ``adagrad`` with that
group's own flags, so ``foreach`` / ``fused`` / ``capturable`` choose torch's single-tensor, foreach
or fused path exactly as they do for ``torch.optim.Adam`` itself. It takes every bucket: strided,
sparse, overlapping, complex, differentiable. Row-wise Adagrad, which torch.optim does not have, runs
:func:`rowwise_adagrad` here: torch ops, one table at a time.

Its gather reads the gradients in Python (torch's functional API takes lists) and checks that the
bucket still holds what the plan was built for: every gradient present, and parameters and
gradients of the planned dtype, shape, device and layout (a change rebuilds the plan, so torch's
own step never meets a tensor it would reject halfway through the step).
"""

from __future__ import annotations

from operator import attrgetter

import torch
from torch.optim.adagrad import adagrad as _torch_adagrad
from torch.optim.adam import adam as _torch_adam

from recap_kernels.backends._base import OK, SPARSE, Availability, Bucket, BucketKey, check_row_indices

_grad_of = attrgetter("grad")


def _signature(p, g) -> tuple:
    """What decides a tensor's bucket and what torch's step accepts: dtypes, shapes, devices, layouts."""
    return (p.dtype, p.shape, p.device, p.layout, g.dtype, g.shape, g.device, g.layout,
            g.layout == torch.strided and p.is_contiguous() and g.is_contiguous())


def rowwise_adagrad(params, grads, state_sums, state_steps, *, lr, lr_decay: float, weight_decay: float, eps: float,
                    maximize: bool) -> None:
    """Row-wise Adagrad (:class:`recap_kernels.optim.RowWiseAdagrad`) with torch ops, in place.

    Per row with a gradient ``g`` (a dense gradient: every row; a sparse one: its rows, duplicates
    summed), in float32 for float32/bfloat16/float16 tables (float64 for float64), one rounding per
    store: ``g += weight_decay * w``; ``sum += mean(g * g)``; ``w -= clr * g / (sqrt(sum) + eps)``
    with ``clr = lr / (1 + (step - 1) * lr_decay)`` after ``step += 1``.
    """
    for param, grad, state_sum, step in zip(params, grads, state_sums, state_steps):
        step += 1
        clr = lr / (1 + (step.to(torch.float64) - 1) * lr_decay)
        math = torch.float64 if param.dtype == torch.float64 else torch.float32
        if grad.is_sparse:  # duplicate rows summed in the math dtype, as the kernels sum them
            grad = torch.sparse_coo_tensor(grad._indices(), grad._values().to(math), grad.shape).coalesce()
            rows, g = grad.indices()[0], grad.values()
            w, s = param.index_select(0, rows).to(math), state_sum.index_select(0, rows).to(math)
        else:
            rows, g, w, s = None, grad.to(math), param.to(math), state_sum.to(math)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + weight_decay * w
        s = s + (g * g).mean(dim=1, keepdim=True)
        w = w - clr.to(math) * g / (s.sqrt() + eps)
        if rows is None:
            state_sum.copy_(s)
            param.copy_(w)
        else:
            state_sum.index_copy_(0, rows, s.to(state_sum.dtype))
            param.index_copy_(0, rows, w.to(param.dtype))


def _amp_args(group, grad_scale, found_inf):
    # Only torch's fused path takes the AMP tensors; the others get unscaled gradients (_unscale).
    if group.get("fused"):
        return {"grad_scale": grad_scale, "found_inf": found_inf}
    return {}


def _unscale(bucket: Bucket, grad_scale, found_inf) -> bool:
    """For torch's non-fused paths, do what GradScaler does for a non-fused optimizer.

    Returns False when ``found_inf`` says to skip the step. Reading it is a host sync, exactly
    the one GradScaler makes for optimizers that cannot take ``found_inf``.
    """
    if found_inf is None and grad_scale is None or all(g.get("fused") for g in bucket.groups):
        return True
    if found_inf is not None and found_inf.item() != 0:
        return False
    if grad_scale is not None:
        for group, _, grads, _, _ in bucket.per_group():
            if not group.get("fused"):
                for g in grads:  # sparse gradients included, so no foreach here
                    g.div_(grad_scale.to(g.device))
    return True


class TorchBackend:
    name = "torch"

    def __repr__(self) -> str:
        return "<recap_kernels backend 'torch'>"

    def available(self, device: torch.device) -> Availability:
        return OK

    def supports(self, kind: str, key: BucketKey, groups) -> Availability:
        return OK

    def bind(self, kind: str, bucket: Bucket, *, tracing: bool) -> None:
        bucket.runs = bucket.split_runs(lambda group: ())
        bucket.planned = None if tracing else tuple(map(_signature, bucket.params, bucket.grads))

    def gather(self, kind: str, bucket: Bucket) -> str:
        grads = list(map(_grad_of, bucket.params))
        if grads.count(None):
            return f"params[{grads.index(None)}] of {bucket.key} has no gradient"
        if bucket.planned is not None and tuple(map(_signature, bucket.params, grads)) != bucket.planned:
            return f"a parameter or gradient of {bucket.key} changed dtype, shape, device or layout"
        for group in bucket.groups:  # a bad Tensor lr raises here, before any bucket is written
            if torch.is_tensor(group["lr"]) and group["lr"].numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if bucket.key.layout == SPARSE:  # whole-row sparse gradients: an index out of range raises before any write
            check_row_indices(bucket.params, grads)
        bucket.grads = grads
        return ""

    def step(self, kind: str, bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
        if not _unscale(bucket, grad_scale, found_inf):
            return
        run = _torch_adam if kind == "adam" else _torch_adagrad
        for group, params, grads, steps, state in bucket.per_group():
            if kind == "rowwise_adagrad":
                rowwise_adagrad(params, grads, state["sum"], steps, lr=group["lr"], lr_decay=group["lr_decay"],
                                weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])
                continue
            common = {
                "foreach": group["foreach"],
                "differentiable": group["differentiable"],
                "fused": group["fused"],
                "has_complex": any(torch.is_complex(p) for p in params),
                "lr": group["lr"],
                "weight_decay": group["weight_decay"],
                "eps": group["eps"],
                "maximize": group["maximize"],
                **_amp_args(group, grad_scale, found_inf),
            }
            if kind == "adam":
                beta1, beta2 = group["betas"]
                run(params, grads, state["exp_avg"], state["exp_avg_sq"],
                    state["max_exp_avg_sq"] if group["amsgrad"] else [], steps, capturable=group["capturable"],
                    decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=group["amsgrad"], beta1=beta1,
                    beta2=beta2, **common)
            else:
                run(params, grads, state["sum"], steps, has_sparse_grad=bucket.key.sparse,
                    lr_decay=group["lr_decay"], **common)


BACKEND = TorchBackend()
