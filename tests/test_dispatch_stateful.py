"""Property-based: every change torch.optim allows between two steps, in any order, on every backend.

A hypothesis state machine drives torch.optim (default path, the oracle) and recap_kernels' optimizer
with the same parameters, gradients and edits, and compares every parameter and state tensor after
every step (Note [Plan invalidation] in recap_kernels/optim/_dispatch.py). Its rules are the edits a
training script, a checkpoint loader or a scheduler makes: clear, replace or delete state, put new
state tensors or a new step in it, swap a parameter in its group, change a parameter's ``.data``
layout, drop a gradient for a step, toggle options, change lr between a float and a Tensor, load a
checkpoint. One more rule makes a change torch.optim rejects halfway through its step (a gradient of
another dtype set through ``.data``): ours must raise before writing anything, and is compared with
what it was before.

A kernel backend runs as ``"auto"`` with the registry's CPU order set to (that backend, torch), so
that a bucket it cannot take (a non-contiguous parameter after a layout change) goes to torch as
it would in training, instead of raising BackendUnavailableError. torch.optim.Adagrad creates its
state in its constructor and fails on a parameter without state, so the rules that drop state or
bring a new parameter run for the Adam family only.

Bounded (a few dozen short runs per backend) so that it stays well under a minute in ``make test``.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch

pytest.importorskip("hypothesis", reason="the test extra (pip install -e '.[test]') brings hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

from recap_kernels import available_backends, backends, optim  # noqa: E402
from tests.reference import assert_optimizer_close  # noqa: E402

BACKENDS = [name for name, (ok, _) in available_backends("cpu").items() if ok]
SHAPES = [(4, 3), (5,), (1,), (2, 3)]
FAMILIES = {
    "adam": (torch.optim.Adam, optim.Adam, {"weight_decay": 0.01}),
    "adamw": (torch.optim.AdamW, optim.AdamW, {}),
    "adagrad": (torch.optim.Adagrad, optim.Adagrad, {"lr_decay": 0.01}),
}
# Runs per (backend, family): the Triton interpreter is slow, the others are not.
EXAMPLES = {"triton": 6, "cpu": 25, "torch": 15}


class _Twins(RuleBasedStateMachine):
    """Subclassed per (backend, family) below."""

    backend = "torch"
    family = "adam"

    @initialize(seed=st.integers(0, 2**16))
    def build(self, seed):
        ref_cls, our_cls, kwargs = FAMILIES[self.family]
        gen = torch.Generator().manual_seed(seed)
        init = [torch.randn(s, generator=gen) for s in SHAPES]
        self.ref_params = [p.clone().requires_grad_() for p in init]
        self.params = [p.clone().requires_grad_() for p in init]
        self.gen = gen

        def groups(ps):
            return [{"params": ps[:2]}, {"params": ps[2:], "lr": 2e-3}]

        self.ref = ref_cls(groups(self.ref_params), **kwargs)
        self.auto_order = backends._AUTO_ORDER["cpu"]
        backends._AUTO_ORDER["cpu"] = (self.backend, "torch")  # restored by teardown
        self.opt = our_cls(groups(self.params), **kwargs)
        self.steps = 0

    def teardown(self):
        if hasattr(self, "auto_order"):
            backends._AUTO_ORDER["cpu"] = self.auto_order

    def _lazy_state(self):
        return self.family != "adagrad"

    def _both(self, edit):
        edit(self.ref, self.ref_params)
        edit(self.opt, self.params)

    # -- steps --------------------------------------------------------------------------------------
    @rule(skip=st.sets(st.integers(0, len(SHAPES) - 1), max_size=2))
    def step(self, skip):
        """A step with fresh gradients; the parameters in ``skip`` have none this step."""
        for i, (r, p) in enumerate(zip(self.ref_params, self.params)):
            g = None if i in skip else torch.randn(p.shape, generator=self.gen)
            r.grad = None if g is None else g.clone()
            p.grad = None if g is None else g.clone()
        self.ref.step()
        self.opt.step()
        self.steps += 1
        if all(p.is_contiguous() for p in self.params):
            assert self.opt.backends_used() == {self.backend}

    @precondition(lambda self: self.steps > 0)
    @rule(i=st.integers(0, len(SHAPES) - 1))
    def a_bad_gradient_raises_and_changes_nothing(self, i):
        """A gradient of another dtype set through .data: torch.optim fails halfway through its step;
        ours fails before writing (only ours is stepped here)."""
        for p in self.params:
            p.grad = torch.randn(p.shape, generator=self.gen)
        self.params[i].grad.data = self.params[i].grad.data.double()
        before = [p.detach().clone() for p in self.params]
        state_before = {id(p): {k: v.clone() for k, v in self.opt.state[p].items()} for p in self.params}
        with pytest.raises(RuntimeError, match="gradient of another dtype"):
            self.opt.step()
        for p, b in zip(self.params, before):
            assert torch.equal(p.detach(), b)
        for p in self.params:
            for k, v in state_before[id(p)].items():
                assert torch.equal(self.opt.state[p][k], v)

    # -- state edits --------------------------------------------------------------------------------
    @precondition(_lazy_state)
    @rule()
    def clear_state(self):
        self._both(lambda opt, ps: opt.state.clear())

    @precondition(_lazy_state)
    @rule()
    def replace_state(self):
        self._both(lambda opt, ps: setattr(opt, "state", defaultdict(dict)))

    @precondition(_lazy_state)
    @rule(i=st.integers(0, len(SHAPES) - 1))
    def delete_state(self, i):
        self._both(lambda opt, ps: opt.state.pop(ps[i], None))

    @rule(i=st.integers(0, len(SHAPES) - 1), value=st.floats(0.0, 1.0))
    def new_state_tensor(self, i, value):
        def edit(opt, ps):
            state = opt.state.get(ps[i])
            if state:
                key = "sum" if "sum" in state else "exp_avg_sq"
                state[key] = torch.full_like(ps[i], value)
        self._both(edit)

    @rule(i=st.integers(0, len(SHAPES) - 1), step=st.integers(0, 5))
    def set_step(self, i, step):
        def edit(opt, ps):
            state = opt.state.get(ps[i])
            if state:
                state["step"] = torch.tensor(float(step))
        self._both(edit)

    @rule()
    def load_checkpoint(self):
        """Both load torch.optim's state_dict (round-tripped through a deep copy, as a checkpoint)."""
        saved = self.ref.state_dict()
        self.ref.load_state_dict(copy.deepcopy(saved))
        self.opt.load_state_dict(copy.deepcopy(saved))

    # -- parameters and options ---------------------------------------------------------------------
    @precondition(_lazy_state)
    @rule(i=st.integers(0, 1), value=st.floats(-1.0, 1.0))
    def swap_parameter(self, i, value):
        """``group["params"][i] = q``: a new parameter of the same shape, in place in the list (and the old
        one's state dropped, without which torch's state_dict() fails)."""
        fresh = torch.full(SHAPES[i], value)

        def edit(opt, ps):
            q = fresh.clone().requires_grad_()
            opt.param_groups[0]["params"][i] = q
            opt.state.pop(ps[i], None)
            ps[i] = q
        self._both(edit)

    @rule(i=st.sampled_from([0, 3]))
    def transpose_data(self, i):
        """``p.data`` replaced by the same values in the other memory layout (contiguous or not)."""
        def edit(opt, ps):
            p = ps[i]
            p.data = p.data.t().contiguous().t() if p.is_contiguous() else p.data.contiguous()
        self._both(edit)

    @rule(g=st.integers(0, 1), maximize=st.booleans(), weight_decay=st.sampled_from([0.0, 0.02]))
    def options(self, g, maximize, weight_decay):
        def edit(opt, ps):
            opt.param_groups[g]["maximize"] = maximize
            opt.param_groups[g]["weight_decay"] = weight_decay
        self._both(edit)

    @rule(g=st.integers(0, 1), as_tensor=st.booleans(), lr=st.sampled_from([1e-3, 5e-3, 2e-2]))
    def learning_rate(self, g, as_tensor, lr):
        self._both(lambda opt, ps: opt.param_groups[g].__setitem__("lr", torch.tensor(lr) if as_tensor else lr))

    @invariant()
    def same_as_torch(self):
        if hasattr(self, "opt"):
            assert_optimizer_close(self.ref, self.ref_params, self.opt, self.params, torch.float32)


def _machine(backend: str, family: str):
    machine = type(f"Twins_{backend}_{family}", (_Twins,), {"backend": backend, "family": family})
    machine.TestCase.settings = settings(max_examples=EXAMPLES.get(backend, 10), stateful_step_count=12,
                                         deadline=None, suppress_health_check=list(HealthCheck))
    return machine.TestCase


for _backend in BACKENDS:
    for _family in FAMILIES:
        globals()[f"TestChangesBetweenSteps_{_backend}_{_family}"] = _machine(_backend, _family)
