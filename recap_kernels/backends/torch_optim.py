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
    # torch's single-tensor and foreach paths assert that no AMP tensors reach them; only its
    # fused path unscales in-kernel (and only then does the optimizer advertise AMP support).
    if group["fused"]:
        return {"grad_scale": grad_scale, "found_inf": found_inf}
    return {}


def adam_step(bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
    for group, params, grads, steps, state in bucket.per_group():
        beta1, beta2 = group["betas"]
        _torch_adam(
            params,
            grads,
            state["exp_avg"],
            state["exp_avg_sq"],
            state.get("max_exp_avg_sq", []),
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
