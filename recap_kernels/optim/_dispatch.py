"""The step shared by recap_kernels' optimizers: validate, bucket, resolve backends, then run.

A step happens in two phases so that a step that raises changes nothing:

1. *Plan* (no side effects): every parameter with a gradient is checked the way torch checks it,
   sorted into buckets by (device, dtype, memory layout) across param groups, and each bucket's
   backend is resolved through the registry. Any error is raised here, before state exists.
2. *Run*: missing state is created in torch's layout, and each bucket goes to its backend.

The plan is cached and reused while nothing that decides it changes (see ``_plan``), so a
steady-state step does no per-tensor checking, bucketing or state lookup in Python.

Subclasses set ``_kind`` ("adam" | "adagrad") and implement ``_check_param(group, p, grad)``
(torch's per-parameter errors), ``_new_state(group, p)`` and ``_state_keys(group)`` (torch's
state layout).
"""

from __future__ import annotations

import os
from operator import itemgetter
from typing import Any

import torch
from torch import Tensor

from recap_kernels.backends import ENV_VAR, Backend, Bucket, BucketKey, check_backend_name, resolve
from recap_kernels.backends._base import layout_of

_STEP_DTYPE = torch.float32
# Group options that decide how tensors are checked, bucketed or given state (see _plan). Values
# the backends read afresh each step (lr, betas, eps) are not among them.
_PLANNING_OPTIONS = ("foreach", "fused", "capturable", "differentiable", "amsgrad", "maximize",
                     "decoupled_weight_decay", "weight_decay", "initial_accumulator_value")


_is_contiguous = Tensor.is_contiguous


def _gradient_layouts(grads: list[Tensor | None]) -> tuple:
    """What the plan needs to know of this step's gradients: which exist, and in what layout.

    The common case, every gradient present and contiguous, is one C-level pass; anything else
    is spelled out per gradient (0 none, 1 contiguous, 2 strided, 3 sparse).
    """
    try:
        layouts = tuple(map(_is_contiguous, grads))  # TypeError on a None gradient
        if False not in layouts:
            return layouts
    except TypeError:
        pass
    return tuple([0 if g is None else 3 if g.is_sparse else 1 if g.is_contiguous() else 2 for g in grads])


def new_step(p: Tensor, value: float = 0.0) -> Tensor:
    """A parameter's step counter: 0-d float32 on the parameter's device (torch's fused layout).

    Kept on the device, not the host, so kernels read it without a host sync and a step can be
    captured in a CUDA graph; one counter per parameter, as torch keeps it, so resuming any
    parameter's state (or adding a group later) keeps its own bias correction.
    """
    return torch.full((), value, dtype=_STEP_DTYPE, device=p.device)


class FusedStepMixin:
    """Mixed into subclasses of torch's optimizers, ahead of them in the MRO."""

    _kind: str = ""

    def _setup_backend(self, backend: str) -> None:
        self._backend_request = check_backend_name(backend)
        self._last_backends: frozenset[str] = frozenset()
        self._bucket_caches: dict[BucketKey, dict] = {}  # per-bucket backend tables, see Bucket.cache
        self._plan_cache: tuple | None = None  # (key, plan): see _plan
        self._flat_cache: tuple | None = None  # (structure key, _flat_params(), the parameters alone)
        self._state_generation = 0
        # GradScaler hands us grad_scale/found_inf instead of unscaling itself: the kernels
        # unscale in place and skip an overflowing step without a host sync.
        self._step_supports_amp_scaling = True

    @property
    def backend(self) -> str:
        """The ``backend=`` this optimizer was built with ("auto" unless set)."""
        return self._backend_request

    def backends_used(self) -> set[str]:
        """Names of the backends that the last ``step()`` dispatched to (empty before the first)."""
        return set(self._last_backends)

    # -- hooks for subclasses -------------------------------------------------------------------
    def _check_param(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> None:
        raise NotImplementedError

    def _new_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    # -- the step ---------------------------------------------------------------------------------
    def _fused_step(self, closure=None):
        # torch's Adam/AdamW check a CUDA-graph capture against their groups' ``capturable``; Adagrad
        # has no such option (its groups no key), and torch's Adagrad does not check.
        if "capturable" in self.defaults:
            self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Autograd records the update only with differentiable=True. torch's optimizers get this
        # from a decorator that also breaks the torch.compile graph; a context manager does not,
        # and the kernels' custom ops mutate their arguments in place either way.
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            self._run(self._plan())
        return loss

    def _run(self, plan: list[tuple[Backend, Bucket]]) -> None:
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for backend, bucket in plan:
            getattr(backend, f"{self._kind}_step")(bucket, grad_scale=grad_scale, found_inf=found_inf)
        self._last_backends = frozenset(backend.name for backend, _ in plan)

    def _plan(self) -> list[tuple[Backend, Bucket]]:
        """This step's buckets and their backends; cached while nothing that decides them changes.

        What decides them: the param groups' membership and planning options, which parameters
        have gradients and in what layout, the state's identity (``load_state_dict`` renews it)
        and the environment variables that select backends. On a cache hit a step's per-tensor
        Python work is gathering the gradients and reading their layouts; the buckets keep their
        parameter and state lists, and pick up the new gradients with one C-level gather each.
        """
        if torch.compiler.is_compiling():  # Dynamo traces the plan into the graph instead
            return [(backend, bucket) for backend, bucket, _ in self._build_plan(self._flat_params())]
        structure = self._structure_key()
        if self._flat_cache is None or self._flat_cache[0] != structure:
            flat = self._flat_params()
            self._flat_cache = (structure, flat, [p for _, p in flat])
        _, flat, params = self._flat_cache
        grads = [p.grad for p in params]
        key = (structure, _gradient_layouts(grads), self._state_generation, os.environ.get(ENV_VAR),
               os.environ.get("TRITON_INTERPRET"))
        cached = self._plan_cache
        if cached is None or cached[0] != key:
            cached = self._plan_cache = (key, self._build_plan(flat))
        else:
            for _, bucket, index in cached[1]:
                bucket.grads = [grads[index[0]]] if len(index) == 1 else list(itemgetter(*index)(grads))
        return [(backend, bucket) for backend, bucket, _ in cached[1]]

    def _flat_params(self) -> list[tuple[int, Tensor]]:
        """``(group index, parameter)`` for every parameter, in optimizer order."""
        return [(gi, p) for gi, group in enumerate(self.param_groups) for p in group["params"]]

    def _structure_key(self) -> tuple:
        # Per group, not per tensor: membership (by identity and count) and the options that
        # change how tensors are checked, bucketed, or given state.
        return tuple(
            (id(group["params"]), len(group["params"]), torch.is_tensor(group["lr"]),
             *(group.get(option) for option in _PLANNING_OPTIONS))
            for group in self.param_groups
        )

    def _build_plan(self, flat: list[tuple[int, Tensor]]) -> list[tuple[Backend, Bucket, list[int]]]:
        # Phase 1: checks only. Members of each bucket, per group, in optimizer order.
        members: dict[BucketKey, list[tuple[int, list[int]]]] = {}
        for i, (gi, p) in enumerate(flat):
            grad = p.grad
            if grad is None:
                continue
            self._check_param(self.param_groups[gi], p, grad)
            key = BucketKey(p.device, p.dtype, layout_of(p, grad))
            spans = members.setdefault(key, [])
            if not spans or spans[-1][0] != gi:
                spans.append((gi, []))
            spans[-1][1].append(i)
        chosen = {
            key: resolve(self._backend_request, key, self._kind, [self.param_groups[gi] for gi, _ in spans])
            for key, spans in members.items()
        }

        # Phase 2: nothing below raises for valid input; state is created only now.
        plan = []
        for key, spans in members.items():
            bucket = Bucket(key, cache=self._bucket_caches.setdefault(key, {}))
            keys = {k: [] for gi, _ in spans for k in self._state_keys(self.param_groups[gi])}
            bucket.state = keys
            index: list[int] = []
            for gi, positions in spans:
                group = self.param_groups[gi]
                start = len(bucket.params)
                for i in positions:
                    p = flat[i][1]
                    state = self.state[p]
                    if len(state) == 0:
                        state.update(self._new_state(group, p))
                    bucket.params.append(p)
                    bucket.grads.append(p.grad)
                    bucket.steps.append(state["step"])
                    for k, tensors in keys.items():
                        tensors.append(state.get(k))  # None where this group keeps no such state
                index.extend(positions)
                bucket.groups.append(group)
                bucket.spans.append((start, len(bucket.params)))
            plan.append((chosen[key], bucket, index))
        return plan

    # -- state placement ----------------------------------------------------------------------------
    def _place_steps(self) -> None:
        """Move every ``step`` to its parameter's device as 0-d float32 (see :func:`new_step`).

        torch keeps ``step`` on the host unless ``fused`` or ``capturable``; state loaded from a
        ``torch.optim`` checkpoint or pickled by an older torch is brought to our layout here.
        """
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "step" not in state:
                    continue
                step = state["step"]
                if not torch.is_tensor(step):
                    state["step"] = new_step(p, float(step))
                elif step.device != p.device or step.dtype != _STEP_DTYPE:
                    state["step"] = step.to(device=p.device, dtype=_STEP_DTYPE)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._place_steps()
        self._state_generation += 1  # new state tensors: cached plans point at the old ones

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles defaults, state and param_groups; the backend request travels too.
        return {**super().__getstate__(), "_backend_request": self._backend_request}

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_backend_request", "auto")
        self.__dict__.setdefault("_last_backends", frozenset())
        self.__dict__.setdefault("_bucket_caches", {})
        self.__dict__.setdefault("_plan_cache", None)
        self.__dict__.setdefault("_flat_cache", None)
        self.__dict__.setdefault("_state_generation", 0)
        self.__dict__.setdefault("_step_supports_amp_scaling", True)
        self._place_steps()
