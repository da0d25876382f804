"""A step under ``torch.compile``: one opaque op per optimizer step, whatever the number of tensors.

Note [Compiled steps]
Dynamo traces Python. Traced like any code, a step would walk every parameter of every group (its
gradient, its state dict, torch's checks), make each parameter, gradient and state tensor a graph input
guarded one by one, and give AOTAutograd the mutations of thousands of list elements to functionalize:
minutes of compilation, and a compiled step slower than the eager one (the guards and input handling
cost more than the step's own host work, which the eager path does in C++).

So a compiled ``step()`` is a single op, ``recap_kernels::optimizer_step``, in the graph: its arguments
are the optimizer's key in a registry of live optimizers (a constant) and GradScaler's
``grad_scale``/``found_inf``. It declares no mutation and returns nothing; it is registered as having
side effects (``torch.fx.node.has_side_effect``), which keeps it in the graph, in program order (a
declared mutation of a counter tensor would do the same and cost a graph input and AOTAutograd's
bookkeeping of a mutated input at every call, about 14 us here). When the graph runs, the op runs the eager
step of that optimizer: its cached plan, the C++ gather of every bucket, one kernel launch per bucket,
and every check of Note [Plan invalidation] (``_dispatch.py``). So the compiled step computes exactly
what the eager one does, costs what it costs, reads lr and the other hyperparameters afresh (changing
them, or a scheduler stepping, recompiles nothing) and reports its backends in ``backends_used()``.

The contract this relies on is the one of a training step: what the step reads (gradients, states) and
writes (parameters, states) is not used by the *same* graph after the step. Dynamo ends a graph at
``loss.backward()``, so in a compiled training step the optimizer's graph starts after the gradients
exist; ``zero_grad`` after the step only drops references. The op is tagged ``cudagraph_unsafe`` where
torch has that tag: its host work reads this step's gradients, which a replayed CUDA graph would not;
CUDA graphs of the step itself are the ``capturable`` path of the eager optimizer (the kernels read
``step``, lr and the AMP tensors on the device).

What a compiled step costs beyond the eager one is the compiled function's own call: Dynamo's frame
hook and guards (about 2 us for this frame's guards), AOTAutograd's runtime wrapper and Inductor's
``call``, against the ``Optimizer.step`` wrapper (profiler range, hooks) that the compiled step leaves
out. On the bench's EPYC (torch 2.14.1, Inductor, CPU): a compiled function that only calls a no-op op
costs 15 us against 1.7 us plain; our compiled step costs the eager step plus 10-20 us with its data in
cache, and up to 0.3 ms more with 5,000 tensors, whose step data (120 MB) evicts the Python objects of
torch.compile's call path between steps (the time inside the op is the eager step's to within 1%). No
op can take that away from inside the graph: it is what any compiled step pays per call.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
import torch.fx.node
from torch import Tensor

# Live optimizers by key: the op's argument is an int, which a graph can hold as a constant.
_OPTIMIZERS: dict[int, weakref.ref] = {}
_keys = itertools.count(1)


def register(opt: Any) -> None:
    """Give ``opt`` its key (at construction and unpickling, never while tracing: the key is a constant of
    every graph of ``opt``); the key is dropped when ``opt`` is collected."""
    key = next(_keys)
    _OPTIMIZERS[key] = weakref.ref(opt, lambda _, key=key: _OPTIMIZERS.pop(key, None))
    opt.__dict__["_compiled_key"] = key


# Defined with torch.library's low-level API (not ``custom_op``, whose Python wrapper added about 13 us
# a call here): the schema, one kernel for every device, a fake kernel.
_LIB = torch.library.Library("recap_kernels", "FRAGMENT")
_LIB.define("optimizer_step(int key, Tensor? grad_scale, Tensor? found_inf) -> ()",
            tags=(torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ())


def _optimizer_step(key: int, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """The eager step of the optimizer registered under ``key`` (Note [Compiled steps])."""
    ref = _OPTIMIZERS.get(key)
    opt = ref() if ref is not None else None
    if opt is None:
        raise RuntimeError("recap_kernels: a compiled step ran for an optimizer that no longer exists")
    opt._eager_step(grad_scale, found_inf)


_LIB.impl("optimizer_step", _optimizer_step, "CompositeExplicitAutograd")
torch.fx.node.has_side_effect(torch.ops.recap_kernels.optimizer_step.default)


@torch.library.register_fake("recap_kernels::optimizer_step", lib=_LIB)
def _(key: int, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    return None


def compiled_step(opt: Any, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """What ``step()`` does while Dynamo traces it: one :func:`optimizer_step` op."""
    torch.ops.recap_kernels.optimizer_step(opt._compiled_key, grad_scale, found_inf)
