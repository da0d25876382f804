"""The cached step plan follows every change that decides it (see FusedStepMixin._plan)."""

import copy

import pytest
import torch

from recap_kernels import BackendUnavailableError, available_backends, optim
from tests.reference import assert_optimizer_close, make_params

BACKENDS = [name for name, (ok, _) in available_backends("cpu").items() if ok]


def _pair(shapes):
    init = make_params(shapes, torch.float32)
    return [p.clone().requires_grad_() for p in init], [p.clone().requires_grad_() for p in init]


def _step(opts_and_params, grads):
    for opt, params in opts_and_params:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_follows_gradient_layout_and_presence(backend):
    ref_params, params = _pair([(6, 4), (9,), (5,)])
    ref = torch.optim.Adam(ref_params, weight_decay=0.1)
    opt = optim.Adam(params, weight_decay=0.1, backend="auto")
    pairs = [(ref, ref_params), (opt, params)]
    gen = torch.Generator().manual_seed(3)

    def grads():
        return [torch.randn(p.shape, generator=gen) for p in params]

    _step(pairs, grads())
    plan = opt._plan_cache
    _step(pairs, grads())
    assert opt._plan_cache is plan  # nothing changed: the plan was reused
    g = grads()
    g[0] = torch.randn(4, 6, generator=gen).t()  # a non-contiguous gradient: a new bucket
    _step(pairs, g)
    assert opt._plan_cache is not plan and "torch" in opt.backends_used()
    g = grads()
    g[1] = None  # a parameter without a gradient this step
    _step(pairs, g)
    _step(pairs, grads())
    assert_optimizer_close(ref, ref_params, opt, params, torch.float32)


def test_plan_follows_group_options_and_the_environment(monkeypatch):
    params = [torch.randn(5, requires_grad=True)]
    params[0].grad = torch.randn(5)
    opt = optim.Adam(params)
    opt.step()
    plan = opt._plan_cache
    opt.param_groups[0]["foreach"] = True  # an option that decides how torch's path runs
    opt.step()
    assert opt._plan_cache is not plan
    monkeypatch.setenv("RECAP_KERNELS_BACKEND", "torch")
    opt.step()
    assert opt.backends_used() == {"torch"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_that_differ_in_amsgrad_share_a_bucket(backend):
    """States that only some groups have (max_exp_avg_sq) stay aligned with their parameters."""
    ref_params, params = _pair([(7,), (300,), (4,), (33,), (5,)])
    split = [{"params": ref_params[:2]}, {"params": ref_params[2:4], "amsgrad": True}, {"params": ref_params[4:]}]
    ref = torch.optim.Adam(split, weight_decay=0.01)
    opt = optim.Adam([{"params": params[:2]}, {"params": params[2:4], "amsgrad": True}, {"params": params[4:]}],
                     weight_decay=0.01, backend=backend)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        _step([(ref, ref_params), (opt, params)], [torch.randn(p.shape, generator=gen) for p in params])
    assert_optimizer_close(ref, ref_params, opt, params, torch.float32)


class _Stream:
    def __init__(self, capturing: bool):
        self.capturing = capturing

    def is_capturing(self) -> bool:
        return self.capturing


@pytest.mark.parametrize("capturing", [False, True])
def test_graph_capture_check_as_torch_where_an_accelerator_is_present(monkeypatch, capturing):
    """torch's Adam checks a CUDA-graph capture against ``capturable``; Adagrad has no such option
    and is not checked (its groups have no ``capturable`` key). Simulates a machine with a GPU."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_stream", lambda device=None: _Stream(capturing))
    p = torch.randn(5, requires_grad=True)
    p.grad = torch.randn(5)
    optim.Adagrad([p], backend="torch").step()  # never a KeyError on 'capturable'
    adam = optim.Adam([p], backend="torch")
    if capturing:
        with pytest.raises(RuntimeError, match="capturable is False"):
            adam.step()
    else:
        adam.step()


# ------------------------------------------------------------------------------------------------
# Changes torch.optim allows between steps (Note [Plan invalidation]): each compared with torch.optim
# ------------------------------------------------------------------------------------------------
FAMILIES = {"adam": (torch.optim.Adam, optim.Adam, {"weight_decay": 0.1}),
            "adagrad": (torch.optim.Adagrad, optim.Adagrad, {"lr_decay": 0.01})}
SHAPES = [(6, 4), (9,), (5,), (1,)]


class _Twins:
    """torch.optim and ours on the same parameters, stepped with the same fresh gradients."""

    def __init__(self, family, backend, shapes=SHAPES, groups=None, **kwargs):
        ref_cls, our_cls, defaults = FAMILIES[family]
        kwargs = {**defaults, **kwargs}
        init = make_params(shapes, torch.float32)
        self.ref_params = [p.clone().requires_grad_() for p in init]
        self.params = [p.clone().requires_grad_() for p in init]
        split = groups or (lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3}])
        self.ref = ref_cls(split(self.ref_params), **kwargs)
        self.opt = our_cls(split(self.params), backend=backend, **kwargs)
        self.gen = torch.Generator().manual_seed(5)

    def step(self, skip=()):
        for i, (r, p) in enumerate(zip(self.ref_params, self.params)):
            g = None if i in skip else torch.randn(p.shape, generator=self.gen, dtype=torch.float64)
            r.grad = None if g is None else g.to(r.dtype)
            p.grad = None if g is None else g.to(p.dtype)
        self.ref.step()
        self.opt.step()

    def check(self):
        assert_optimizer_close(self.ref, self.ref_params, self.opt, self.params, torch.float32)
        # state_dict() too: a cleared state must not come back from a stale plan (and where torch's fails,
        # e.g. on the state of a parameter swapped out of its group, ours fails the same way)
        try:
            expected = self.ref.state_dict()["state"].keys()
        except KeyError:
            with pytest.raises(KeyError):
                self.opt.state_dict()
            return
        assert self.opt.state_dict()["state"].keys() == expected

    def both(self, edit):
        edit(self.ref, self.ref_params)
        edit(self.opt, self.params)


STATE_EDITS = {
    "clear": lambda opt, ps: opt.state.clear(),
    "replace": lambda opt, ps: setattr(opt, "state", __import__("collections").defaultdict(dict)),
    "delete": lambda opt, ps: opt.state.__delitem__(ps[1]),
    "new exp_avg / sum": lambda opt, ps: opt.state[ps[0]].__setitem__(
        "sum" if "sum" in opt.state[ps[0]] else "exp_avg", torch.full_like(ps[0], 0.25)),
    "step reset": lambda opt, ps: opt.state[ps[2]].__setitem__("step", torch.tensor(0.0)),
    "state dict assigned": lambda opt, ps: opt.state.__setitem__(ps[3], {}),
}


@pytest.mark.parametrize("edit", list(STATE_EDITS))
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_edited_between_steps_is_what_torch_uses(backend, family, edit):
    """Issue 9, bug 1: clear/replace/delete state, new state tensors, a reset step."""
    twins = _Twins(family, backend)
    twins.step()
    twins.step()
    twins.both(STATE_EDITS[edit])
    twins.step()
    twins.check()
    twins.step()
    twins.check()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_params_swapped_in_place_in_a_group(backend, family):
    """Issue 9, bug 2: ``group["params"][0] = q`` keeps the length; the new parameter is the one stepped."""
    twins = _Twins(family, backend)
    twins.step()
    fresh = torch.randn(6, 4)

    def swap(opt, ps):
        q = fresh.clone().requires_grad_()
        opt.param_groups[0]["params"][0] = q
        ps[0] = q

    twins.both(swap)
    twins.step()
    twins.step()
    twins.check()
    assert twins.opt.state[twins.params[0]]["step"].item() == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_that_fails_in_a_later_bucket_changes_nothing(backend):
    """Issue 9, bug 3: a float32 gradient behind a float64 parameter (set through .data) fails the step;
    the float32 bucket, stepped first otherwise, is not touched."""
    p32 = torch.randn(5, requires_grad=True)
    p64 = torch.randn(7, dtype=torch.float64, requires_grad=True)
    opt = optim.Adam([p32, p64], backend=backend)
    for p in (p32, p64):
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p32.detach().clone(), p64.detach().clone(), opt.state[p32]["step"].clone(),
              opt.state[p32]["exp_avg"].clone()]
    p32.grad = torch.randn_like(p32)
    p64.grad = torch.randn_like(p64)
    p64.grad.data = torch.randn(7)  # float32 data behind a float64 parameter
    with pytest.raises(RuntimeError, match="gradient of another dtype"):
        opt.step()
    after = [p32.detach(), p64.detach(), opt.state[p32]["step"], opt.state[p32]["exp_avg"]]
    for a, b in zip(after, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_with_channels_last_state_loads_into_contiguous_parameters(backend, family):
    """Issue 9, bug 4: state saved from a channels_last parameter; torch runs, and so do we."""
    ref_cls, our_cls, kwargs = FAMILIES[family]
    donor = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    donor.grad = torch.randn_like(donor)
    donor_opt = ref_cls([donor], **kwargs)
    donor_opt.step()
    state_dict = donor_opt.state_dict()
    init = torch.randn(2, 3, 4, 5)
    ref_p, p = init.clone().requires_grad_(), init.clone().requires_grad_()
    ref, opt = ref_cls([ref_p], **kwargs), our_cls([p], backend=backend, **kwargs)
    ref.load_state_dict(copy.deepcopy(state_dict))
    opt.load_state_dict(copy.deepcopy(state_dict))
    for _ in range(2):
        g = torch.randn(2, 3, 4, 5)
        ref_p.grad, p.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    assert_optimizer_close(ref, [ref_p], opt, [p], torch.float32)


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_data_replaced_by_a_non_contiguous_tensor_after_a_step(backend):
    """Issue 9, bug 5: ``p.data`` becomes non-contiguous: auto routes the bucket to torch; an explicit
    kernel backend says it cannot run it; torch.optim's numbers either way."""
    twins = _Twins("adam", backend)
    twins.step()

    def transpose(opt, ps):
        ps[0].data = ps[0].data.t().contiguous().t()  # same values, column-major

    twins.both(transpose)
    if backend in ("auto", "torch"):
        twins.step()
        twins.check()
        assert "torch" in twins.opt.backends_used()
    else:
        with pytest.raises(BackendUnavailableError, match="contiguous"):
            twins.opt.step()


@pytest.mark.parametrize("family", ["adam", "adagrad"])
@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_state_laid_out_unlike_its_parameter_goes_back_to_the_kernels(backend, family):
    """State in another memory layout than its contiguous parameter (made by torch while ``p.data``
    was transposed, or set by hand): made contiguous with its values at the next step, so the
    kernels take the bucket again; the numbers stay torch.optim's."""
    twins = _Twins(family, backend)
    if backend == "auto":  # torch steps the transposed parameter, creating (or updating) its state so
        twins.both(lambda opt, ps: setattr(ps[0], "data", ps[0].data.t().contiguous().t()))
        twins.step()
        assert "torch" in twins.opt.backends_used()
        twins.both(lambda opt, ps: setattr(ps[0], "data", ps[0].data.contiguous()))
    else:
        twins.step()
        twins.both(lambda opt, ps: opt.state[ps[0]].update(
            {k: v.t().contiguous().t() for k, v in opt.state[ps[0]].items() if k != "step"}))
    if family == "adam" or backend != "auto":  # (Adagrad's state exists before the step: contiguous)
        assert not any(v.is_contiguous() for k, v in twins.opt.state[twins.params[0]].items() if k != "step")
    for _ in range(2):
        twins.step()
        twins.check()
    assert backend == "torch" or "torch" not in twins.opt.backends_used()
    assert all(v.is_contiguous() for v in twins.opt.state[twins.params[0]].values())


@pytest.mark.parametrize("change", ["grad float32 behind float64", "param switched to float64", "lr of 2 elements",
                                    "grad of another shape"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_what_the_kernels_would_misread_is_refused_before_any_write(backend, change):
    """Issue 9, bug 6: every backend checks what its kernels will read, before the first write."""
    params = [torch.randn(8, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = optim.Adam(params, lr=torch.tensor(1e-3), backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    if change == "grad float32 behind float64":
        params[1].data = params[1].data.double()
        params[1].grad.data = torch.randn(3)
    elif change == "param switched to float64":
        params[1].data = params[1].data.double()
        params[1].grad.data = params[1].grad.data.double()
    elif change == "lr of 2 elements":
        opt.param_groups[0]["lr"] = torch.tensor([1e-3, 1e-3])
    else:
        params[0].grad.data = torch.randn(2, 4)
    before = [p.detach().clone() for p in params] + [opt.state[p][k].clone() for p in params for k in opt.state[p]]
    with pytest.raises((RuntimeError, ValueError), match="another dtype|1-element|another dtype, shape"):
        opt.step()
    after = [p.detach() for p in params] + [opt.state[p][k] for p in params for k in opt.state[p]]
    for a, b in zip(after, before):
        assert a.dtype != b.dtype or torch.equal(a, b)


def test_meta_device_parameters_step_like_torch():
    """Issue 9, bug 7: meta parameters (shape-only models) step on the torch backend, as torch.optim's do."""
    for cls in (optim.Adam, optim.AdamW, optim.Adagrad):
        p = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
        p.grad = torch.empty(4, 3, device="meta")
        opt = cls([p])
        opt.step()
        opt.step()
        assert opt.backends_used() == {"torch"}
        assert opt.state[p]["step"].item() == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_amsgrad_switched_on_mid_training_says_which_state_is_missing(backend):
    """Issue 9, bug 8: torch.optim fails with KeyError; we fail with the state's name, and change nothing."""
    p = torch.randn(6, requires_grad=True)
    opt = optim.Adam([p], backend=backend)
    p.grad = torch.randn(6)
    opt.step()
    opt.param_groups[0]["amsgrad"] = True
    before = p.detach().clone(), opt.state[p]["step"].clone()
    with pytest.raises(RuntimeError, match="without 'max_exp_avg_sq'.*amsgrad was switched on"):
        opt.step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(opt.state[p]["step"], before[1])


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_step_bumps_the_version_counters(backend, family):
    """Issue 9, bug 9: autograd notices a parameter (or state) updated under a graph that saved it."""
    twins = _Twins(family, backend)
    twins.step()
    p = twins.params[0]
    state = twins.opt.state[p]
    versions = [p._version] + [t._version for t in state.values()]
    twins.step()
    assert [p._version] + [t._version for t in state.values()] > versions
    assert p._version > versions[0] and all(t._version > v for t, v in zip(state.values(), versions[1:]))
    w = p * 2
    y = (w * p).sum()  # saves p for backward
    twins.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_overlapping_views_as_parameters_update_in_order_like_torch(backend):
    """Issue 9, bug 10: two parameters that share memory; the kernels update tensors in parallel, so such
    a bucket goes to torch (or an explicit kernel backend says why not): deterministic, torch's numbers."""
    def make(cls, **kw):
        base = torch.linspace(-1, 1, 40_000).requires_grad_(False)
        a, b = base[:30_000].requires_grad_(), base[10_000:].requires_grad_()
        return cls([a, b], **kw), [a, b], base

    ref, ref_params, ref_base = make(torch.optim.Adam)
    opt, params, base = make(optim.Adam, backend=backend)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for k in range(3):
            for ps in (ref_params, params):
                for i, p in enumerate(ps):
                    p.grad = torch.full_like(p, 0.1 * (i + 1 + k))
            ref.step()
            if backend in ("auto", "torch"):
                opt.step()
            else:
                with pytest.raises(BackendUnavailableError, match="share memory"):
                    opt.step()
                return
    finally:
        torch.set_num_threads(threads)
    assert "torch" in opt.backends_used()
    assert torch.equal(base, ref_base)


# ------------------------------------------------------------------------------------------------
# The host path: constant Python work per bucket (issue 10)
# ------------------------------------------------------------------------------------------------
def _python_calls_per_step(backend, family, n, monkeypatch):
    """Python-level calls (and C calls made from Python) of one cached step over ``n`` tensors in 11 groups."""
    import sys

    if backend == "triton":  # the interpreter runs a GPU kernel's programs in Python: not host work
        from recap_kernels._triton import ops

        monkeypatch.setattr(ops, "_launch", lambda *args, **kwargs: None)
    params = [torch.randn(1 + i % 3, requires_grad=True) for i in range(n)]
    _, cls, kwargs = FAMILIES[family]
    opt = cls([{"params": params[g::11], "lr": 1e-3 * (g + 1)} for g in range(11)], backend=backend, **kwargs)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        p.grad = torch.randn_like(p)  # new gradient tensors, as after zero_grad(set_to_none=True)
    calls = []
    sys.setprofile(lambda frame, event, arg: calls.append(event) if event in ("call", "c_call") else None)
    try:
        opt.step()
    finally:
        sys.setprofile(None)
    assert opt._last_change == "no plan yet", "the step reused the plan"
    return len(calls)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_a_cached_step_does_no_per_tensor_python(backend, family, monkeypatch):
    assert _python_calls_per_step(backend, family, 50, monkeypatch) == \
        _python_calls_per_step(backend, family, 5000, monkeypatch)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend (TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("edit", ["clear", "new exp_avg / sum", "step reset"])
def test_triton_without_the_extension_notices_the_same_changes(edit, monkeypatch):
    """Without recap_kernels._C the Triton backend gathers and checks in Python (PyBoundBucket): the
    same changes are noticed, a bad gradient is refused before any write, and version counters move."""
    from recap_kernels._triton import ops
    from recap_kernels.backends._bound import PyBoundBucket

    built = []
    monkeypatch.setattr(ops, "bound_bucket", lambda *args: built.append(PyBoundBucket(*args)) or built[-1])
    twins = _Twins("adam", "triton")
    twins.step()
    twins.both(STATE_EDITS[edit])
    twins.step()
    twins.check()
    assert built and all(isinstance(b, PyBoundBucket) for b in built)
    p = twins.params[1]
    version = p._version
    twins.step()
    assert p._version > version
    for q in twins.params:
        q.grad = torch.randn_like(q)
    p.grad.data = p.grad.data.double()
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="gradient of another dtype"):
        twins.opt.step()
    assert torch.equal(p.detach(), before)
