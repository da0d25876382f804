"""The step shared by recap_kernels' optimizers: plan, gather, run.

A step happens in three phases so that a step that raises changes nothing:

1. *Plan* (cached, see Note [Plan invalidation]): every parameter with a gradient is checked the
   way torch checks it (and against its own gradient and state: dtypes, shapes, devices), sorted
   into buckets by (device, dtype, memory layout) across param groups, and each bucket's backend is
   resolved through the registry. Any error is raised before state exists; then missing state is
   created in torch's layout, state laid out unlike its contiguous parameter is made contiguous
   (values kept: after ``p.data`` changed layout the parameter goes back to the kernels), and each
   backend binds its buckets (C++ bound buckets, device tables).
2. *Gather* (reads only): every bucket reads this step's gradients and hyperparameters and checks
   that its tensors are still what the plan was built for. A difference anywhere rebuilds the plan;
   an invalid hyperparameter raises. No bucket has been written yet.
3. *Run*: each bucket goes to its backend.

Subclasses set ``_kind`` ("adam" | "adagrad") and implement ``_check_param(group, p, grad)``
(torch's per-parameter errors), ``_new_state(group, p)`` and ``_state_keys(group)`` (torch's
state layout).

Note [Plan invalidation]
A cached plan is an optimization, never a semantic: a step reuses it only when nothing that torch's
own step reads afresh has changed. What is checked at every step, and how (constant Python work per
param group and per bucket; the per-tensor checks run in C++):

* the param groups: each group's identity, its ``"params"`` list's identity and length, whether its
  ``lr`` is a Tensor, and the options that decide checks, buckets or state (``_PLANNING_OPTIONS``,
  and whether ``weight_decay`` is zero), compared as one tuple (:meth:`FusedStepMixin._structure_key`);
* the containers' contents: ``opt.state`` and every group's ``"params"`` are observed containers
  (``_observed.py``) that count their changes; the plan records the count, so clearing, replacing,
  deleting or editing state (``state[p]["exp_avg"] = t``, ``state[p]["step"] = ...``) and editing a
  params list in place (``group["params"][0] = q``) are seen without walking them. ``opt.state``
  replaced by another object is seen by identity (and becomes observed when the plan is rebuilt); a
  params list replaced by a plain list is checked element by element (at C speed) while it is one;
* parameters without a gradient when the plan was built: still without one (one C-level pass);
* every bucket's tensors, by its backend's gather: the kernel backends' BoundBuckets check in C++
  that each parameter, state tensor and step counter has the planned storage, dtype, shape, device
  and contiguity, and that each gradient exists and is a contiguous dense tensor of its parameter's
  dtype and shape (Note [Bound buckets] in csrc/common/bucket.h); the torch backend checks that
  every gradient exists and that parameters and gradients keep their dtype, shape, device and layout;
* the environment variables that select backends (``RECAP_KERNELS_BACKEND``, ``TRITON_INTERPRET``).

Values the backends read afresh at every step are not part of a plan: lr, betas, eps, weight
decay, lr_decay (and the value of a Tensor lr).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from operator import attrgetter, is_
from typing import Any

import torch
from torch import Tensor

from recap_kernels.backends import ENV_VAR, Backend, Bucket, BucketKey, check_backend_name, resolve
from recap_kernels.backends._base import (
    CONTIGUOUS,
    DTENSOR,
    OVERLAPPING,
    SHARDED,
    SPARSE,
    SPARSE_OTHER,
    STRIDED,
    is_dtensor,
    local_shard,
    state_names,
)
from recap_kernels.optim._compiled import compiled_step, register
from recap_kernels.optim._observed import ObservedList, ObservedState, mutations, observed_state

log = logging.getLogger("recap_kernels")

_STEP_DTYPE = torch.float32
# Group options that decide how tensors are checked, bucketed or given state (see _structure_key).
# Values the backends read afresh each step (lr, betas, eps, weight decay) are not among them.
_PLANNING_OPTIONS = ("foreach", "fused", "capturable", "differentiable", "amsgrad", "maximize",
                     "decoupled_weight_decay")
# Devices whose kernels read ``step`` where the parameter lives; elsewhere torch's default keeps it
# on the host (meta parameters, accelerators only the torch backend runs), unless fused/capturable.
_KERNEL_DEVICES = ("cpu", "cuda")
_grad_of = attrgetter("grad")
# Plans kept per optimizer (see FusedStepMixin._plan).
_MAX_PLANS = 4


def _environment() -> tuple:
    return os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET")


def new_step(p: Tensor, value: float = 0.0, on_device: bool = True) -> Tensor:
    """A parameter's step counter: 0-d float32 on the parameter's device (torch's fused layout).

    Kept on the device, not the host, so kernels read it without a host sync and a step can be
    captured in a CUDA graph; one counter per parameter, as torch keeps it, so resuming any
    parameter's state (or adding a group later) keeps its own bias correction. ``on_device=False``
    (parameters no kernel runs, such as meta tensors) keeps it on the host, as torch's default does.
    """
    return torch.full((), value, dtype=_STEP_DTYPE, device=p.device if on_device else "cpu")


def _overlapping(tensors: list[Tensor]) -> bool:
    """Whether any two of these contiguous tensors share memory (a kernel would race on it)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel())
    return any(start < end for (_, end), (start, _) in zip(spans, spans[1:]))


class _Plan:
    """A step's buckets and backends, and what they were built from (Note [Plan invalidation])."""

    def __init__(self, entries: list[tuple[Backend, Bucket]]) -> None:
        self.entries = entries
        self.backend_names = frozenset(backend.name for backend, _ in entries)
        for _, bucket in entries:  # Note [Table steps]: whether a table op's own checks precede every write
            bucket.alone = len(entries) == 1

    def record(self, opt: FusedStepMixin, structure: tuple, gradless: list[Tensor]) -> _Plan:
        """What this plan was built from, for :meth:`current` (not for traced plans, which are not cached)."""
        self.structure = structure
        self.state = opt.state
        self.mutations = mutations()  # after the state the plan created
        self.environment = _environment()
        self.plain_lists = [(group["params"], tuple(group["params"])) for group in opt.param_groups
                            if type(group["params"]) is not ObservedList]
        self.gradless = gradless
        return self

    def current(self, opt: FusedStepMixin, structure: tuple) -> bool:
        """Whether nothing that decides this plan changed since it was built (the tensors aside);
        ``structure`` is the optimizer's ``_structure_key()`` now."""
        if opt.state is not self.state or mutations() != self.mutations or structure != self.structure:
            return False
        if _environment() != self.environment:
            return False
        for params, planned in self.plain_lists:
            if len(params) != len(planned) or not all(map(is_, params, planned)):
                return False
        return not self.gradless or list(map(_grad_of, self.gradless)).count(None) == len(self.gradless)

    def gather(self, kind: str) -> str:
        """Every bucket's gather: ``""`` when all its tensors are as planned, else the first change."""
        for backend, bucket in self.entries:
            change = backend.gather(kind, bucket)
            if change:
                return change
        return ""

    def run(self, kind: str, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        for backend, bucket in self.entries:
            backend.step(kind, bucket, grad_scale=grad_scale, found_inf=found_inf)
            bucket.grads = []  # the next gather reads them again; a cached plan must not keep them alive


def _check_amp(grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (not isinstance(t, Tensor) or t.numel() != 1 or t.dtype != torch.float32):
            raise RuntimeError(f"{name} must be a one-element float32 tensor, as torch.amp.GradScaler makes it")


class FusedStepMixin:
    """Mixed into subclasses of torch's optimizers, ahead of them in the MRO."""

    _kind: str = ""

    def _setup_backend(self, backend: str) -> None:
        self._backend_request = check_backend_name(backend)
        register(self)  # its key for compiled steps (Note [Compiled steps])
        self._last_backends: frozenset[str] = frozenset()
        self._plans: OrderedDict[int, _Plan] = OrderedDict()  # recent plans, most recently used last
        self._plan_cache: _Plan | None = None  # the plan of the last step
        self._last_change = ""  # why the last plan was rebuilt (debugging, tests)
        # GradScaler hands us grad_scale/found_inf instead of unscaling itself: the kernels unscale in
        # place and skip an overflowing step without a host sync. ShardedGradScaler (FSDP2) too: its
        # check runs on the DTensor gradients, whose found_inf DTensor agrees across ranks
        # (tests/test_distributed.py overflows one rank's shard only).
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

    def _state_shape(self, p: Tensor) -> torch.Size:
        """The shape of ``p``'s state tensors: ``p``'s own, but for row-wise Adagrad's one value a row."""
        return p.shape

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return state_names(self._kind, group.get("amsgrad", False))

    # -- observed containers (Note [Plan invalidation]) ----------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "state":
            value = observed_state(value)
        super().__setattr__(name, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["params"] = ObservedList(group["params"])

    # -- the step ---------------------------------------------------------------------------------
    def _fused_step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if torch.compiler.is_compiling() and not self.defaults.get("differentiable"):
            # One op that runs _eager_step (Note [Compiled steps]); as little traced as possible: what is
            # traced is guarded, and the guards run at every call.
            compiled_step(self, grad_scale, found_inf)
            return loss
        # torch's Adam/AdamW check a CUDA-graph capture against their groups' ``capturable``; Adagrad
        # has no such option (its groups no key), and torch's Adagrad does not check. (torch skips the
        # check under torch.compile too.)
        if "capturable" in self.defaults:
            self._accelerator_graph_capture_health_check()
        self._eager_step(grad_scale, found_inf)
        return loss

    def _eager_step(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        _check_amp(grad_scale, found_inf)
        # Autograd records the update only with differentiable=True. torch's optimizers get this
        # from a decorator that also breaks the torch.compile graph; a context manager does not,
        # and the kernels' custom ops mutate their arguments in place either way.
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable"))):
            plan = self._plan()
            plan.run(self._kind, grad_scale, found_inf)
        self._last_backends = plan.backend_names

    def _plan(self) -> _Plan:
        """This step's plan, gathered: a cached one when it still holds (Note [Plan invalidation]).

        A few recent plans are kept (``_MAX_PLANS``), so a step pattern that alternates between two
        plans (a parameter whose gradient is ``None`` every other step) switches between them instead
        of rebuilding one each step.
        """
        if torch.compiler.is_compiling():  # differentiable=True: Dynamo traces the plan into the graph
            plan = self._build_plan(tracing=True)
            plan.gather(self._kind)
            return plan
        change = "no plan yet"
        structure = None
        for key in reversed(self._plans):
            plan = self._plans[key]
            if structure is None:
                structure = self._structure_key()
            if not plan.current(self, structure):
                change = "the optimizer changed"
                continue
            change = plan.gather(self._kind)
            if not change:
                self._plans.move_to_end(key)
                self._plan_cache = plan
                return plan
        self._last_change = change
        log.debug("recap_kernels: a new step plan (%s)", change)
        self._plan_cache = None  # a plan that fails to build must not be used
        plan = self._build_plan()
        change = plan.gather(self._kind)
        if change:
            raise RuntimeError(f"recap_kernels: a plan built this step does not hold ({change}); this is a bug, "
                               f"please report it")
        self._plans[id(plan)] = self._plan_cache = plan
        if len(self._plans) > _MAX_PLANS:
            self._plans.popitem(last=False)
        return plan

    def _structure_key(self) -> tuple | None:
        # Per group, not per tensor: membership (by identity and count) and the options that
        # change how tensors are checked, bucketed, or given state.
        get = self.__dict__.get("_option_getter")
        if get is None:
            options = tuple(option for option in _PLANNING_OPTIONS if option in self.defaults)
            get = self.__dict__["_option_getter"] = lambda group, _options=options: tuple(map(group.get, _options))
        return tuple(
            (id(group), id(group["params"]), len(group["params"]), torch.is_tensor(group["lr"]),
             not group.get("weight_decay"), get(group))
            for group in self.param_groups
        )

    def _check_tensors(self, i: int, group: dict[str, Any], p: Tensor, grad: Tensor, state: dict | None) -> None:
        """What torch's step would reject halfway through, rejected before anything changes."""
        where = f"parameter {i} of the optimizer ({tuple(p.shape)} {p.dtype} on {p.device})"
        if grad.dtype != p.dtype or grad.shape != p.shape or grad.device != p.device:
            raise RuntimeError(f"{where} has a gradient of another dtype, shape or device ({tuple(grad.shape)} "
                               f"{grad.dtype} on {grad.device}), e.g. set through .data: torch.optim fails on it too")
        if not state:
            return
        for name in self._state_keys(group):
            if name not in state:
                raise RuntimeError(
                    f"{where} has state without {name!r}, which this step needs"
                    + (": amsgrad was switched on after its first step (torch.optim fails too, with KeyError); "
                       "add the state (e.g. max_exp_avg_sq = exp_avg_sq.clone()) or clear this parameter's state"
                       if name == "max_exp_avg_sq" else ""))
            t = state[name]
            if not isinstance(t, Tensor) or t.dtype != p.dtype or t.shape != self._state_shape(p) or t.device != p.device:
                got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
                raise RuntimeError(f"{where} has state {name!r} of another dtype, shape or device ({got}): "
                                   f"torch.optim fails on it too; convert the state or load it with load_state_dict")
        if "step" not in state:
            raise RuntimeError(f"{where} has state without 'step'")

    def _layout(self, p: Tensor, grad: Tensor, state: dict | None, tracing: bool) -> str:
        states = [t for k, t in (state or {}).items() if k != "step" and isinstance(t, Tensor)]
        if is_dtensor(p):
            return SHARDED if self._shards_alike(p, grad, states) else DTENSOR
        if grad.is_sparse:  # whole rows of a contiguous table go to the table kernels (Note [Table steps])
            whole_rows = grad.sparse_dim() == 1 and p.dim() >= 1 and p.is_contiguous()
            return SPARSE if whole_rows and all(t.is_contiguous() for t in states) else SPARSE_OTHER
        if not (p.is_contiguous() and grad.is_contiguous()):
            return STRIDED
        # State laid out unlike its contiguous parameter (created while p.data was transposed or
        # channels_last, or set by hand) is made contiguous in phase 2, values kept, as load_state_dict
        # does: one layout change of p.data must not send a parameter to the slow path for good.
        if all(t.is_contiguous() for t in states) or (not tracing and all(t.layout == torch.strided for t in states)):
            return CONTIGUOUS
        return STRIDED

    def _shards_alike(self, p: Tensor, grad: Tensor, states: list[Tensor]) -> bool:
        """Whether the kernels can step this DTensor parameter on its local shards (Note [Sharded parameters]
        in backends/_base.py): gradient and state sharded as ``p``, every local tensor contiguous.
        State not made yet will be (``zeros_like(p)``). Row-wise Adagrad's row means need whole rows:
        its tables may be sharded by rows (``Shard(0)``, as FSDP2 shards) or replicated, not by columns."""
        if grad.is_sparse:
            return False
        mesh, placements = p.device_mesh, p.placements
        if self._kind == "rowwise_adagrad" and not all(x.is_replicate() or x.is_shard(0) for x in placements):
            return False
        return all(is_dtensor(t) and t.device_mesh == mesh and t.placements == placements
                   and local_shard(t).is_contiguous() for t in (p, grad, *states))

    def _build_plan(self, tracing: bool = False) -> _Plan:
        if not tracing and type(self.state) is not ObservedState:
            self.__dict__["state"] = observed_state(self.state)
        structure = None if tracing else self._structure_key()
        flat = [(gi, p) for gi, group in enumerate(self.param_groups) for p in group["params"]]

        # Phase 1: checks only. Members of each bucket, per group, in optimizer order.
        members: dict[BucketKey, list[tuple[int, list[int]]]] = {}
        gradless: list[Tensor] = []
        for i, (gi, p) in enumerate(flat):
            grad = p.grad
            if grad is None:
                gradless.append(p)
                continue
            group = self.param_groups[gi]
            self._check_param(group, p, grad)
            state = self.state.get(p)
            self._check_tensors(i, group, p, grad, state)
            key = BucketKey(p.device, p.dtype, self._layout(p, grad, state, tracing))
            spans = members.setdefault(key, [])
            if not spans or spans[-1][0] != gi:
                spans.append((gi, []))
            spans[-1][1].append(i)
        if not tracing:
            apart = [k for k in members if k.layout in (CONTIGUOUS, SHARDED) and k.device.type in _KERNEL_DEVICES]
            for key in apart:
                written = [local_shard(t) if key.layout == SHARDED else t for _, positions in members[key]
                           for i in positions for t in (flat[i][1], *self._state_tensors(flat[i][1]))]
                if _overlapping(written):
                    members[key._replace(layout=OVERLAPPING)] = members.pop(key)
        chosen = {
            key: resolve(self._backend_request, key, self._kind, [self.param_groups[gi] for gi, _ in spans])
            for key, spans in members.items()
        }

        # Phase 2: nothing below raises for valid input; state is created only now.
        entries = []
        for key, spans in members.items():
            bucket = Bucket(key)
            bucket.state = {name: [] for gi, _ in spans for name in self._state_keys(self.param_groups[gi])}
            for gi, positions in spans:
                group = self.param_groups[gi]
                start = len(bucket.params)
                for i in positions:
                    p = flat[i][1]
                    state = self.state.get(p)
                    if not state:
                        self.state[p] = self._new_state(group, p)
                        state = self.state[p]
                    else:
                        self._normalize_step(group, p, state)
                        if key.layout == CONTIGUOUS:
                            self._contiguous_state(state)
                    bucket.params.append(p)
                    bucket.grads.append(p.grad)
                    bucket.steps.append(state["step"])
                    for name, tensors in bucket.state.items():
                        tensors.append(state.get(name))  # None where this group keeps no such state
                bucket.groups.append(group)
                bucket.spans.append((start, len(bucket.params)))
            chosen[key].bind(self._kind, bucket, tracing=tracing)
            entries.append((chosen[key], bucket))
        plan = _Plan(entries)
        return plan if tracing else plan.record(self, structure, gradless)

    @staticmethod
    def _contiguous_state(state: dict) -> None:
        for name, value in list(state.items()):
            if name != "step" and isinstance(value, Tensor) and not value.is_contiguous():
                state[name] = value.contiguous()

    def _state_tensors(self, p: Tensor) -> list[Tensor]:
        state = self.state.get(p) or {}
        return [t for k, t in state.items() if k != "step" and isinstance(t, Tensor)]

    # -- state placement ----------------------------------------------------------------------------
    def _step_on_device(self, group: dict[str, Any], p: Tensor) -> bool:
        return p.device.type in _KERNEL_DEVICES or bool(group.get("fused")) or bool(group.get("capturable"))

    def _normalize_step(self, group: dict[str, Any], p: Tensor, state: dict) -> None:
        """``state["step"]`` as :func:`new_step` makes it, keeping its value.

        torch keeps ``step`` on the host unless ``fused`` or ``capturable``; state loaded from a
        ``torch.optim`` checkpoint, pickled by an older torch or set by hand is brought to our layout.
        """
        step = state.get("step")
        if step is None:
            return
        device = p.device if self._step_on_device(group, p) else torch.device("cpu")
        if not torch.is_tensor(step):
            state["step"] = torch.full((), float(step), dtype=_STEP_DTYPE, device=device)
        elif step.device != device or step.dtype != _STEP_DTYPE or step.dim() != 0:
            state["step"] = step.detach().reshape(()).to(device=device, dtype=_STEP_DTYPE)

    def _normalize_state(self) -> None:
        """Every parameter's state in our layout: steps as :meth:`_normalize_step` makes them, and state
        tensors laid out as their parameter (a checkpoint saved from a channels_last parameter loads
        into a contiguous one as contiguous state, which the kernels take)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                self._normalize_step(group, p, state)
                for name, value in list(state.items()):
                    if name != "step" and isinstance(value, Tensor) and value.shape == p.shape and \
                            value.layout == p.layout == torch.strided and value.stride() != p.stride():
                        state[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._normalize_state()

    def state_dict(self) -> dict[str, Any]:
        # Plain dicts, as torch.optim returns them: a checkpoint loads anywhere, with weights_only=True.
        state_dict = super().state_dict()
        state_dict["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in state_dict["state"].items()}
        return state_dict

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles defaults, state and param_groups; the backend request travels too.
        return {**super().__getstate__(), "_backend_request": self._backend_request}

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.__dict__["state"] = observed_state(self.state)
        for group in self.param_groups:
            if type(group["params"]) is not ObservedList:
                group["params"] = ObservedList(group["params"])
        for name, default in (("_backend_request", "auto"), ("_last_backends", frozenset()), ("_plan_cache", None),
                              ("_last_change", ""), ("_step_supports_amp_scaling", True)):
            self.__dict__.setdefault(name, default)
        self.__dict__.setdefault("_plans", OrderedDict())
        register(self)  # a copy is another optimizer: its own key
        self.__dict__.pop("_option_getter", None)
        self._normalize_state()
