"""The ``triton`` backend: Triton kernels for the dense Adam/AdamW and Adagrad steps, and for embedding
tables (Note [Table steps]: Adagrad with sparse gradients, row-wise Adagrad; ``_triton/embedding.py``).

Runs CUDA tensors, and CPU tensors only under ``TRITON_INTERPRET=1`` (the test suite). It takes
contiguous float32/bfloat16/float16/float64 tensors, with dense gradients or, for the table steps,
sparse gradients of whole rows; the registry routes every other bucket (non-contiguous tensors,
other sparse gradients, overlapping parameters, complex parameters, ``differentiable=True``) to the
torch backend under ``"auto"`` and refuses it, with that reason, when ``"triton"`` is explicit.

A bucket whose param groups differ in ``amsgrad``, ``maximize`` or decoupled weight decay
(compile-time switches of the kernel) takes one launch per combination; everything else that
differs per group (lr, betas, eps, weight decay, lr_decay) is read from the group's table row.
The tables and launches live in ``recap_kernels/_triton/ops.py``; importing it imports Triton,
which happens on first use.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from recap_kernels.backends._base import (
    OK,
    Availability,
    Bucket,
    BucketKey,
    amp_on_device,
    bind_kernel_bucket,
    gather_runs,
    is_table_step,
    kernel_supports,
    step_tables,
    table_supports,
)


def _kernels():
    """The Triton steps, imported on first use (importing them imports Triton)."""
    from recap_kernels._triton import ops

    return ops


class TritonBackend:
    name = "triton"

    def __init__(self) -> None:
        self._import_error: str | None = None

    def __repr__(self) -> str:
        return "<recap_kernels backend 'triton'>"

    def _importable(self) -> Availability:
        if self._import_error is None:
            try:
                _kernels()
                self._import_error = ""
            except Exception as exc:  # a broken Triton install must become a reason, not a crash
                self._import_error = f"the Triton kernels failed to import: {exc!r}"
        return Availability(not self._import_error, self._import_error)

    def available(self, device: torch.device) -> Availability:
        if importlib.util.find_spec("triton") is None:
            return Availability(False, "triton is not installed")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return Availability(False, "no CUDA device is available")
        elif device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") != "1":
                return Availability(False, "Triton runs on CPU tensors only under TRITON_INTERPRET=1")
        else:
            return Availability(False, f"Triton kernels run on CUDA devices, not {device.type}")
        return self._importable()

    def supports(self, kind: str, key: BucketKey, groups) -> Availability:
        if is_table_step(kind, key):  # _triton/embedding.py ships with the dense kernels
            return table_supports("the Triton kernels", kind, key, groups, OK)
        return kernel_supports("the Triton kernels", key, groups)

    def bind(self, kind: str, bucket: Bucket, *, tracing: bool) -> None:
        if bind_kernel_bucket(kind, bucket, tracing):
            for run in bucket.runs:
                _kernels().bind_run(kind, bucket, run)

    def gather(self, kind: str, bucket: Bucket) -> str:
        return gather_runs(kind, bucket)

    def step(self, kind: str, bucket: Bucket, *, grad_scale=None, found_inf=None) -> None:
        grad_scale, found_inf = amp_on_device(bucket.key.device, grad_scale, found_inf)
        if is_table_step(kind, bucket.key):  # Note [Table steps]
            from recap_kernels._triton import embedding

            step_tables(kind, bucket, embedding.sparse_adagrad_step, embedding.rowwise_adagrad_step,
                        grad_scale=grad_scale, found_inf=found_inf)
            return
        for run in bucket.runs:
            if run.bound is not None:
                _kernels().step_run(kind, bucket, run, grad_scale=grad_scale, found_inf=found_inf)
                continue
            hyper, lr_tensors = run.hyper
            params, steps = bucket.params[run.part], bucket.steps[run.part]
            grads = bucket.grads[run.part]
            states = bucket.run_states(kind, run)
            if kind == "adam":
                amsgrad, decoupled, maximize = run.switches
                torch.ops.recap_kernels.triton_adam_(
                    params, grads, states[0], states[1], states[2] if amsgrad else [], steps, run.sizes, hyper,
                    lr_tensors, amsgrad, decoupled, maximize, grad_scale, found_inf)
            else:
                torch.ops.recap_kernels.triton_adagrad_(params, grads, states[0], steps, run.sizes, hyper,
                                                        lr_tensors, run.switches[0], grad_scale, found_inf)


BACKEND = TritonBackend()
