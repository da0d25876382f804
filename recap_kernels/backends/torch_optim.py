"""The ``torch`` backend: stock ``torch.optim`` math, the reference every other backend matches.

Each param group's span of a bucket goes to torch's functional ``adam`` / ``adagrad`` with that
group's own flags, so ``foreach`` / ``fused`` / ``capturable`` choose torch's single-tensor, foreach
or fused path exactly as they do for ``torch.optim.Adam`` itself.
"""

from __future__ import annotations

import torch
from torch.optim.adagrad import adagrad as _torch_adagrad
from torch.optim.adam import adam as _torch_adam

from recap_kernels.backends._base import OK, Availability, Bucket, BucketKey

name = "torch"


def available(device: torch.device) -> Availability:
    return OK


def supports(kind: str, key: BucketKey, groups) -> Availability:
    return OK


def _amp_args(group, grad_scale, found_inf):
    # Only torch's fused path takes the AMP tensors; the others get unscaled gradients (_unscale).
    if group["fused"]:
        return {"grad_scale": grad_scale, "found_inf": found_inf}
    return {}


def _unscale(bucket: Bucket, grad_scale, found_inf) -> bool:
    """For torch's non-fused paths, do what GradScaler does for a non-fused optimizer.

    Returns False when ``found_inf`` says to skip the step. Reading it is a host sync, exactly
    the one GradScaler makes for optimizers that cannot take ``found_inf``.
    """
    if found_inf is None and grad_scale is None or all(g["fused"] for g in bucket.groups):
        return True
    if found_inf is not None and found_inf.item() != 0:
        return False
    if grad_scale is not None:
        for group, _, grads, _, _ in bucket.per_group():
            if not group["fused"]:
                for g in grads:  # sparse gradients included, so no foreach here
                    g.div_(grad_scale.to(g.device))
    return True


def adam_step(bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
    if not _unscale(bucket, grad_scale, found_inf):
        return
    for group, params, grads, steps, state in bucket.per_group():
        beta1, beta2 = group["betas"]
        _torch_adam(
            params,
            grads,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["max_exp_avg_sq"] if group["amsgrad"] else [],
            steps,
            foreach=group["foreach"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            fused=group["fused"],
            has_complex=any(torch.is_complex(p) for p in params),
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            **_amp_args(group, grad_scale, found_inf),
        )


def adagrad_step(bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
    if not _unscale(bucket, grad_scale, found_inf):
        return
    for group, params, grads, steps, state in bucket.per_group():
        _torch_adagrad(
            params,
            grads,
            state["sum"],
            steps,
            fused=group["fused"],
            has_sparse_grad=bucket.key.sparse,
            foreach=group["foreach"],
            differentiable=group["differentiable"],
            has_complex=any(torch.is_complex(p) for p in params),
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            lr_decay=group["lr_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            **_amp_args(group, grad_scale, found_inf),
        )
