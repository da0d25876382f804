"""The C++ CPU ops themselves: torch's fused CPU kernels to the bit, registration, checks, routing.

The optimizer-level equivalence (every option, every dtype, resumes) is the shared harness's job
(test_equivalence.py runs it for the ``cpu`` backend); this file calls the ops directly.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import re

import pytest
import torch

from recap_kernels import BackendUnavailableError, available_backends, optim
from tests.reference import FLOAT_DTYPES, adagrad_hyper, adam_hyper, dtype_id

CPU_OK, CPU_WHY = available_backends("cpu")["cpu"]
pytestmark = pytest.mark.skipif(not CPU_OK, reason=f"cpu backend unavailable: {CPU_WHY}")

if CPU_OK:
    from recap_kernels import _ops

# Sizes around torch's vector width (16 floats, 32 bf16 on AVX-512), its tail loop and an empty tensor.
SIZES = (1, 31, 33, 4097, 0, 100_003)


def _tensors(sizes, dtype, seed=0, scale=1.0, positive=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        t = torch.randn(n, generator=gen, dtype=torch.float64) * scale
        out.append((t.abs() if positive else t).to(dtype))
    return out


def _adam_state(sizes, dtype, amsgrad):
    params = _tensors(sizes, dtype, 0)
    grads = _tensors(sizes, dtype, 1, 0.1)
    exp_avgs = _tensors(sizes, dtype, 2, 0.01)
    exp_avg_sqs = _tensors(sizes, dtype, 3, 0.001, positive=True)
    maxima = [v * 1.5 for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(float(3 + i)) for i in range(len(sizes))]
    return [params, grads, exp_avgs, exp_avg_sqs, maxima, steps]


def _clone(state):
    return [[t.clone() for t in tensors] for tensors in state]


def _assert_bitwise(got, expected, what):
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a[~a.isnan()], b[~b.isnan()]), (
            f"{what}[{i}] differs in {(a != b).sum().item()} of {a.numel()} elements"
        )


def _assert_like_torch_fused(got, expected, what):
    """torch's fused CPU kernels to the bit: their vector loops and their scalar tails (the last
    numel % W elements of each tensor, Note [CPU tail order] in adam_math.h) alike."""
    _assert_bitwise(got, expected, what)


ADAM_CASES = list(itertools.product([False, True], [0.0, 0.1], [False, True], [False, True], [0.9, 0.3]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("amsgrad,weight_decay,decoupled,maximize,beta1", ADAM_CASES,
                         ids=lambda v: str(v))
def test_adam_is_torchs_fused_cpu_kernel_to_the_bit(dtype, amsgrad, weight_decay, decoupled, maximize, beta1):
    """Same operation order, same roundings (Note [Operation order] in adam_math.h).

    beta1=0.3 takes the other branch of torch's lerp (weight 1 - beta1 >= 0.5).
    """
    state = _adam_state(SIZES, dtype, amsgrad)
    ref = _clone(state)
    for s in ref[5]:
        s += 1  # torch's Python wrapper advances the step before its kernel reads it
    fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
    fused(*ref, lr=1e-3, beta1=beta1, beta2=0.999, weight_decay=weight_decay, eps=1e-8, amsgrad=amsgrad,
          maximize=maximize)
    ours = _clone(state)
    _ops.fused_adam_(*ours, [len(SIZES)], adam_hyper([1e-3], [beta1], [0.999], [1e-8], [weight_decay]), [None],
                     amsgrad=amsgrad, decoupled=decoupled, maximize=maximize)
    for name, got, expected in zip(("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"), ours, ref):
        _assert_like_torch_fused(got, expected, name)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("weight_decay,maximize,lr_decay", list(itertools.product([0.0, 0.1], [False, True],
                                                                                   [0.0, 0.01])), ids=str)
def test_adagrad_is_torchs_fused_cpu_kernel_to_the_bit(dtype, weight_decay, maximize, lr_decay):
    params, grads = _tensors(SIZES, dtype, 0), _tensors(SIZES, dtype, 1, 0.1)
    sums = _tensors(SIZES, dtype, 2, 0.01, positive=True)
    steps = [torch.tensor(float(3 + i)) for i in range(len(SIZES))]
    state = [params, grads, sums, steps]
    ref = _clone(state)
    for s in ref[3]:
        s += 1
    torch._fused_adagrad_(*ref, lr=0.0123, lr_decay=lr_decay, weight_decay=weight_decay, eps=1e-10,
                          maximize=maximize)
    ours = _clone(state)
    _ops.fused_adagrad_(*ours, [len(SIZES)], adagrad_hyper([0.0123], [lr_decay], [1e-10], [weight_decay]), [None],
                        maximize=maximize)
    for name, got, expected in zip(("param", "grad", "sum", "step"), ours, ref):
        _assert_like_torch_fused(got, expected, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_amp_unscales_into_the_grads_and_found_inf_skips_everything(dtype):
    state = _adam_state(SIZES, dtype, False)
    state[1] = [g * 1024 for g in state[1]]
    grad_scale = torch.tensor(1024.0 * 3)
    ref = _clone(state)
    for s in ref[5]:
        s += 1
    torch._fused_adam_(*ref, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                       maximize=False, grad_scale=grad_scale, found_inf=torch.tensor(0.0))
    ours = _clone(state)
    hyper = ([len(SIZES)], adam_hyper([1e-3], [0.9], [0.999], [1e-8], [0.0]), [None])
    _ops.fused_adam_(*ours, *hyper, amsgrad=False, decoupled=False, maximize=False, grad_scale=grad_scale,
                     found_inf=torch.tensor(0.0))
    for name, got, expected in zip(("param", "grad", "exp_avg", "exp_avg_sq", "-", "step"), ours, ref):
        _assert_like_torch_fused(got, expected, name)

    skipped = _clone(state)
    _ops.fused_adam_(*skipped, *hyper, amsgrad=False, decoupled=False, maximize=False, grad_scale=grad_scale,
                     found_inf=torch.tensor(1.0))
    for got, before in zip(skipped, state):
        _assert_bitwise(got, before, "a found_inf step's tensor")


# -- torch's scalar tails (Note [CPU tail order], Note [CPU Adagrad tail order]) --------------------------------------

ADAM_TAIL_OPTIONS = list(itertools.product([False, True], [0.0, 0.1], [False, True], [False, True], [0.9, 0.3],
                                           [None, 3.0]))
ADAGRAD_TAIL_OPTIONS = list(itertools.product([0.0, 0.1], [False, True], [0.0, 0.01], [None, 3.0]))


# Magnitudes of a parameter, a gradient, exp_avg, exp_avg_sq (or Adagrad's sum) and max_exp_avg_sq.
_SLOT_SCALES = (1.0, 0.1, 0.01, 0.001, 0.0015)


class _Lists:
    """Lists of tensors of ``sizes`` that are contiguous views into one buffer each: the kernels take
    them as any tensors, and a whole list is compared, cloned or refilled in one call."""

    def __init__(self, buffers, sizes):
        self.buffers, self.sizes = buffers, list(sizes)
        self.lists = [list(b.split(self.sizes)) for b in buffers]

    def clone(self):
        return _Lists([b.clone() for b in self.buffers], self.sizes)

    def assert_same(self, other, names, what):
        for name, a, b in zip(names, self.buffers, other.buffers):
            if not _same_bits(a, b):
                bad = (a != b) & ~(a.isnan() & b.isnan())
                first = int(bad.nonzero()[0])
                tensor = next(i for i, end in enumerate(itertools.accumulate(self.sizes)) if end > first)
                raise AssertionError(f"{what}: {name} differs in {int(bad.sum())} of {a.numel()} elements, first in "
                                     f"tensor {tensor} of {self.sizes[tensor]} elements: {a[first]} vs {b[first]}")


def _same_bits(a, b):
    nan = a.isnan()
    return bool(torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan]))


def _random_buffers(sizes, dtype, gen, slots):
    """One random buffer per slot of ``slots`` (indices into _SLOT_SCALES), over a few binades, so that
    roundings differ from element to element; state slots are positive."""
    n = sum(sizes)
    out = []
    for k in slots:
        t = torch.randn(n, generator=gen, dtype=torch.float64) * _SLOT_SCALES[k]
        t = t * torch.exp2(torch.randint(-3, 4, (n,), generator=gen).double())
        out.append((t.abs() if k >= 3 else t).to(dtype))
    return out


def _step_counters(count, gen, low=0, high=30):
    return [torch.tensor(float(s)) for s in torch.randint(low, high, (count,), generator=gen).tolist()]


@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_adam_tails(dtype, steps=8, tensors=256, seed=0):
    """Every Adam/AdamW option on tensors of 1 to 7 elements (all of them in torch's scalar tail, but
    for float64's first 4): ours against torch._fused_adam(w)_, bit for bit after every step."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 8, (tensors,), generator=gen).tolist()
    names = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for amsgrad, weight_decay, decoupled, maximize, beta1, scale in ADAM_TAIL_OPTIONS:
        ours = _Lists(_random_buffers(sizes, dtype, gen, (0, 1, 2, 3, 4 if amsgrad else 3)), sizes)
        ref = ours.clone()
        ours_steps = _step_counters(tensors, gen)
        ref_steps = [s + 1 for s in ours_steps]  # torch's Python wrapper advances the step before its kernel
        fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
        what = (f"{dtype} amsgrad={amsgrad} weight_decay={weight_decay} decoupled={decoupled} maximize={maximize} "
                f"beta1={beta1} grad_scale={scale}")
        for k in range(steps):
            grads = _random_buffers(sizes, dtype, gen, (1,))[0] * (scale or 1.0)
            ours.buffers[1].copy_(grads)
            ref.buffers[1].copy_(grads)
            amp = {"grad_scale": torch.tensor(scale), "found_inf": torch.tensor(0.0)} if scale else {}
            maxima = (lambda lists: lists.lists[4] if amsgrad else [])
            _ops.fused_adam_(*ours.lists[:4], maxima(ours), ours_steps, [tensors],
                             adam_hyper([1e-3], [beta1], [0.999], [1e-8], [weight_decay]), [None], amsgrad=amsgrad,
                             decoupled=decoupled, maximize=maximize, **amp)
            with _threads(1):  # its per-tensor parallel regions cost more than they save on these sizes
                fused(*ref.lists[:4], maxima(ref), ref_steps, lr=1e-3, beta1=beta1, beta2=0.999,
                      weight_decay=weight_decay, eps=1e-8, amsgrad=amsgrad, maximize=maximize, **amp)
            torch._foreach_add_(ref_steps, 1.0)
            ours.assert_same(ref, names, f"{what}, step {k + 1}")
            assert [s.item() for s in ours_steps] == [s.item() - 1 for s in ref_steps]


def _check_adagrad_tails(dtype, steps=8, tensors=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 8, (tensors,), generator=gen).tolist()
    for weight_decay, maximize, lr_decay, scale in ADAGRAD_TAIL_OPTIONS:
        ours = _Lists(_random_buffers(sizes, dtype, gen, (0, 1, 3)), sizes)
        ref = ours.clone()
        ours_steps = _step_counters(tensors, gen)
        ref_steps = [s + 1 for s in ours_steps]
        what = f"{dtype} weight_decay={weight_decay} maximize={maximize} lr_decay={lr_decay} grad_scale={scale}"
        for k in range(steps):
            grads = _random_buffers(sizes, dtype, gen, (1,))[0] * (scale or 1.0)
            ours.buffers[1].copy_(grads)
            ref.buffers[1].copy_(grads)
            amp = {"grad_scale": torch.tensor(scale), "found_inf": torch.tensor(0.0)} if scale else {}
            _ops.fused_adagrad_(*ours.lists, ours_steps, [tensors],
                                adagrad_hyper([0.0123], [lr_decay], [1e-10], [weight_decay]), [None],
                                maximize=maximize, **amp)
            with _threads(1):
                torch._fused_adagrad_(*ref.lists, ref_steps, lr=0.0123, lr_decay=lr_decay, weight_decay=weight_decay,
                                      eps=1e-10, maximize=maximize, **amp)
            torch._foreach_add_(ref_steps, 1.0)
            ours.assert_same(ref, ("param", "grad", "sum"), f"{what}, step {k + 1}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_tails_are_torchs_to_the_bit(dtype):
    """Tensors of 1 to 7 elements are (nearly) all torch's scalar tail, whose FMAs differ from its
    vector loop's; every option, several steps."""
    _check_adam_tails(dtype)
    _check_adagrad_tails(dtype)


def test_amsgrad_tail_keeps_the_maximum_when_exp_avg_sq_is_nan():
    """torch's tail takes std::max(max_exp_avg_sq, exp_avg_sq), which drops a NaN second operand; its
    vector loop propagates it. 9 float32 elements: 8 in the vector loop, 1 in the tail."""
    state = _Lists(_random_buffers([9], torch.float32, torch.Generator().manual_seed(3), (0, 1, 2, 3, 4)), [9])
    state.buffers[1][0] = state.buffers[1][-1] = float("nan")
    ref = state.clone()
    _ops.fused_adam_(*state.lists, [torch.tensor(5.0)], [1], adam_hyper([1e-3], [0.9], [0.999], [1e-8], [0.0]),
                     [None], amsgrad=True, decoupled=False, maximize=False)
    torch._fused_adam_(*ref.lists, [torch.tensor(6.0)], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                       amsgrad=True, maximize=False)
    maxima = ref.buffers[4]
    assert maxima[0].isnan() and not maxima[-1].isnan(), "torch's own loops, as Note [CPU tail order] says"
    state.assert_same(ref, ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), "amsgrad, NaN gradients")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_per_group_scalars_are_torchs_to_the_bit(dtype):
    """torch's compiled host code fuses AdamW's 1 - lr * weight_decay and Adagrad's 1 + (step - 1) * lr_decay
    into FMAs (AVX2 build; Note [CPU tail order]): a double's last bit, which float64 results show.
    200 groups of random hyperparameters, one 6-element tensor each, one call."""
    gen = torch.Generator().manual_seed(5)
    groups = 200
    lrs = (10 ** (-4 * torch.rand(groups, generator=gen, dtype=torch.float64))).tolist()
    wds = (10 ** (-3 * torch.rand(groups, generator=gen, dtype=torch.float64))).tolist()
    lr_decays = (10 ** (-4 * torch.rand(groups, generator=gen, dtype=torch.float64))).tolist()
    sizes = [6] * groups
    for optimizer in ("adamw", "adagrad"):
        slots = (0, 1, 2, 3) if optimizer == "adamw" else (0, 1, 3)
        ours = _Lists(_random_buffers(sizes, dtype, gen, slots), sizes)
        ref = ours.clone()
        ours_steps = _step_counters(groups, gen, 0, 1000)
        ref_steps = [s + 1 for s in ours_steps]
        if optimizer == "adamw":
            _ops.fused_adam_(*ours.lists, [], ours_steps, [1] * groups,
                             adam_hyper(lrs, [0.9] * groups, [0.999] * groups, [1e-8] * groups, wds), [None] * groups,
                             amsgrad=False, decoupled=True, maximize=False)
        else:
            _ops.fused_adagrad_(*ours.lists, ours_steps, [1] * groups,
                                adagrad_hyper(lrs, lr_decays, [1e-10] * groups, [0.0] * groups), [None] * groups,
                                maximize=False)
        with _threads(1):
            for g in range(groups):
                part = [lst[g:g + 1] for lst in ref.lists] + [ref_steps[g:g + 1]]
                if optimizer == "adamw":
                    torch._fused_adamw_(*part[:4], [], part[4], lr=lrs[g], beta1=0.9, beta2=0.999,
                                        weight_decay=wds[g], eps=1e-8, amsgrad=False, maximize=False)
                else:
                    torch._fused_adagrad_(*part, lr=lrs[g], lr_decay=lr_decays[g], weight_decay=0.0, eps=1e-10,
                                          maximize=False)
        ours.assert_same(ref, ("param", "grad", "state", "state"), f"{optimizer} {dtype}")


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX"),
                    reason="torch runs its DEFAULT kernels here already: the tail test covers them")
def test_tails_match_torchs_default_build_without_fma():
    """ATEN_CPU_CAPABILITY=default makes torch run its DEFAULT build (no FMA instruction); the kernels
    must notice (csrc/cpu/torch_kernels.cpp) and compute without FMA too, tails and vector loops."""
    import os
    import subprocess
    import sys

    code = ("import torch; assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
            "from tests.test_cpu_ops import _check_adam_tails, _check_adagrad_tails, _check_long_run\n"
            "for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):\n"
            "    _check_adam_tails(dtype, steps=2, tensors=48)\n"
            "    _check_adagrad_tails(dtype, steps=2, tensors=48)\n"
            "    _check_long_run('adam', dtype, steps=40, check_every=20)\n")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


# What a tensor weighs in the CPU kernels' split of a bucket between threads, beyond its elements
# (kTensorWork in csrc/cpu/multi_tensor.h, Note [CPU work split]).
_TENSOR_WORK = 64


def _long_run_layout(dtype, seed):
    """Sizes 1..100 in random order, in three groups, between two large tensors sized so that the bucket
    passes the parallel grain and the point where two threads split it (the middle of its work, Note
    [CPU work split]) falls in the scalar tail of a small tensor: that tail is cut between two threads."""
    width = 32 // torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(seed)
    small = [n + 1 for n in torch.randperm(100, generator=gen).tolist()]
    cut = next(j for j, n in enumerate(small) if n > width and n % width == width - 1)  # the longest tail
    small = small[cut:] + small[:cut]  # that tensor right after the first large one
    last = 70_001
    into_tail = small[0] - small[0] % width + (width - 1) // 2  # where the cut should fall in it
    count = len(small) + 2
    # The cut is at work ceil((first + sum(small) + last + count * _TENSOR_WORK) / 2), which falls
    # into_tail elements into small[0] when it equals first + 2 * _TENSOR_WORK + into_tail.
    first = sum(small) + last + count * _TENSOR_WORK - 4 * _TENSOR_WORK - 2 * into_tail
    return [first] + small + [last], [35, 33, 34]


def _check_long_run(optimizer, dtype, steps=2000, check_every=250, seed=0):
    """Sizes 1..100 (one bucket, three groups with their own hyperparameters) over ``steps`` steps
    against torch's fused kernels, one call per group; the thread count alternates between 1 and 2
    every ``check_every`` steps, when every tensor is compared."""
    sizes, group_sizes = _long_run_layout(dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    grad_sets = [_random_buffers(sizes, dtype, gen, (1,))[0] for _ in range(3)]
    if optimizer == "adagrad":
        slots, names = (0, 1, 3), ("param", "grad", "sum")
        lrs, lr_decays, epss, wds = [1e-2, 3e-2, 2e-3], [0.0, 1e-3, 0.0], [1e-10, 1e-8, 1e-10], [0.0, 0.1, 0.01]
        hyper, maximize = adagrad_hyper(lrs, lr_decays, epss, wds), True
    else:
        amsgrad, decoupled = optimizer == "adam", optimizer == "adamw"
        slots, names = (0, 1, 2, 3, 4) if amsgrad else (0, 1, 2, 3), ("param", "grad", "exp_avg", "exp_avg_sq",
                                                                        "max_exp_avg_sq")
        lrs, beta1s, beta2s, epss = [1e-3, 3e-3, 1e-4], [0.9, 0.3, 0.95], [0.999, 0.99, 0.9], [1e-8, 1e-6, 1e-8]
        wds = [0.0, 0.1, 0.01]
        hyper, maximize = adam_hyper(lrs, beta1s, beta2s, epss, wds), optimizer == "adamw"
    ours = _Lists(_random_buffers(sizes, dtype, gen, slots), sizes)
    ref = ours.clone()
    ours_steps = [torch.tensor(0.0) for _ in sizes]
    ref_steps = [torch.tensor(0.0) for _ in sizes]
    bounds = list(itertools.accumulate([0] + group_sizes))
    for k in range(steps):
        grads = grad_sets[k % len(grad_sets)]
        ours.buffers[1].copy_(grads)  # no grad_scale: the gradients stay as they are
        ref.buffers[1].copy_(grads)
        with _threads(1 + (k // check_every) % 2):
            if optimizer == "adagrad":
                _ops.fused_adagrad_(*ours.lists, ours_steps, group_sizes, hyper, [None] * 3, maximize=maximize)
            else:
                _ops.fused_adam_(*ours.lists[:4], ours.lists[4] if amsgrad else [], ours_steps, group_sizes, hyper,
                                 [None] * 3, amsgrad=amsgrad, decoupled=decoupled, maximize=maximize)
        torch._foreach_add_(ref_steps, 1.0)  # torch's Python wrapper advances the steps before its kernel
        with _threads(1):  # torch's result does not depend on its thread count
            for g in range(len(group_sizes)):
                part = [lst[bounds[g]:bounds[g + 1]] for lst in ref.lists + [ref_steps]]
                if optimizer == "adagrad":
                    torch._fused_adagrad_(*part, lr=lrs[g], lr_decay=lr_decays[g], weight_decay=wds[g],
                                          eps=epss[g], maximize=maximize)
                else:
                    fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
                    maxima = part[4] if amsgrad else []
                    fused(*part[:4], maxima, part[-1], lr=lrs[g], beta1=beta1s[g], beta2=beta2s[g],
                          weight_decay=wds[g], eps=epss[g], amsgrad=amsgrad, maximize=maximize)
        if (k + 1) % check_every == 0 or k + 1 == steps:
            ours.assert_same(ref, names, f"{optimizer} {dtype} after {k + 1} steps")
    assert [s.item() for s in ours_steps] == [float(steps)] * len(sizes)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "adagrad"])
def test_sizes_1_to_100_match_torch_over_thousands_of_steps(optimizer, dtype):
    _check_long_run(optimizer, dtype)


def test_one_call_spans_groups_with_their_own_hyperparameters_and_tensor_lr():
    """Three groups in one call equal three separate calls, each group with its own lr/betas/eps/wd."""
    sizes = (5, 40, 3, 700, 1, 64, 9)
    group_sizes = [2, 4, 1]
    lrs, lr_tensors = [1e-3, 0.0, 3e-3], [None, torch.tensor(2e-3), None]
    beta1s, beta2s, epss, wds = [0.9, 0.8, 0.95], [0.999, 0.99, 0.9], [1e-8, 1e-6, 1e-7], [0.0, 0.1, 0.01]
    state = _adam_state(sizes, torch.float32, True)
    together = _clone(state)
    _ops.fused_adam_(*together, group_sizes, adam_hyper(lrs, beta1s, beta2s, epss, wds), lr_tensors,
                     amsgrad=True, decoupled=True, maximize=False)
    apart = _clone(state)
    start = 0
    for g, size in enumerate(group_sizes):
        span = [tensors[start:start + size] for tensors in apart]
        lr = float(lr_tensors[g]) if lr_tensors[g] is not None else lrs[g]
        _ops.fused_adam_(*span, [size], adam_hyper([lr], [beta1s[g]], [beta2s[g]], [epss[g]], [wds[g]]), [None],
                         amsgrad=True, decoupled=True, maximize=False)
        start += size
    for got, expected in zip(together, apart):
        _assert_bitwise(got, expected, "grouped")
    assert [s.item() for s in together[5]] == [4.0 + i for i in range(len(sizes))]


def test_result_does_not_depend_on_the_thread_split():
    """Tensors cut between threads (sizes past the parallel grain) update exactly as on one thread."""
    sizes = (70_001, 1, 200_000, 3, 131_073)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            state = _adam_state(sizes, torch.bfloat16, False)
            _ops.fused_adam_(*state, [len(sizes)], adam_hyper([1e-3], [0.9], [0.999], [1e-8], [0.0]), [None],
                             amsgrad=False, decoupled=False, maximize=False)
            results.append(state)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for got, expected in zip(other, results[0]):
            _assert_bitwise(got, expected, "threaded")


def _small_adam_args(amsgrad=True):
    state = _adam_state((5, 3), torch.float32, amsgrad)
    return (*state, [1, 1], adam_hyper([1e-3, 0.0], [0.9, 0.8], [0.999, 0.99], [1e-8, 1e-6], [0.0, 0.1]),
            [None, torch.tensor(2e-3)])


def test_opcheck_fused_adam():
    args = _small_adam_args()
    for kwargs in ({"amsgrad": True, "decoupled": False, "maximize": False},
                   {"amsgrad": True, "decoupled": True, "maximize": True,
                    "grad_scale": torch.tensor(4.0), "found_inf": torch.tensor(0.0)}):
        torch.library.opcheck(torch.ops.recap_kernels.fused_adam_.default, args, kwargs)


def test_opcheck_fused_adagrad_and_convert():
    params, grads = _tensors((5, 3), torch.float32, 0), _tensors((5, 3), torch.float32, 1)
    sums = _tensors((5, 3), torch.float32, 2, positive=True)
    steps = [torch.tensor(1.0), torch.tensor(2.0)]
    args = (params, grads, sums, steps, [2], adagrad_hyper([0.01], [0.0], [1e-10], [0.1]), [None])
    torch.library.opcheck(torch.ops.recap_kernels.fused_adagrad_.default, args, {"maximize": False})
    torch.library.opcheck(torch.ops.recap_kernels._convert_.default,
                          (torch.empty(7, dtype=torch.bfloat16), torch.randn(7)))


def test_torch_compile_traces_a_step_through_the_fake_kernel():
    """The op is opaque to Dynamo: a compiled step runs it once and matches the eager step."""
    def step(params, grads, exp_avgs, exp_avg_sqs, steps, lr):
        _ops.fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, [len(params)], [0.0, 0.9, 0.999, 1e-8, 0.01],
                         [lr], amsgrad=False, decoupled=True, maximize=False)

    state = _adam_state((17, 4), torch.float32, False)
    del state[4]
    eager = _clone(state)
    compiled = _clone(state)
    lr = torch.tensor(1e-2)
    compiled_step = torch.compile(step, backend="aot_eager", fullgraph=True)
    for _ in range(3):
        step(*eager, lr)
        compiled_step(*compiled, lr)
    for got, expected in zip(compiled, eager):
        _assert_bitwise(got, expected, "compiled")


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a[1].pop(), "grads must have one tensor per parameter"),
    (lambda a: a[2].__setitem__(0, a[2][0].double()), "exp_avgs\\[0\\] has dtype Double"),
    (lambda a: a[3].__setitem__(1, torch.zeros(4)), "exp_avg_sqs\\[1\\] has 4 elements"),
    (lambda a: a[0].__setitem__(0, torch.zeros(10)[::2]), "params\\[0\\] must be contiguous"),
    (lambda a: a[5].__setitem__(0, torch.tensor([1.0, 2.0])), "state_steps\\[0\\] must be a one-element float32"),
    (lambda a: a[6].__setitem__(0, 2), "group_sizes add up to 3 tensors, but params has 2"),
    (lambda a: a[7].pop(), "hyper must have 5 values per group"),
    (lambda a: a[8].pop(), "lr_tensors must have one entry per group"),
    (lambda a: a[8].__setitem__(1, torch.tensor([1.0, 2.0])), "lr_tensors\\[1\\] must have one element"),
])
def test_bad_arguments_are_refused_with_the_argument_named(mutate, message):
    args = [list(a) if isinstance(a, list) else a for a in _small_adam_args()]
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        _ops.fused_adam_(*args, amsgrad=True, decoupled=False, maximize=False)


def _param_with_grad(p, grad=None):
    p = p.detach().requires_grad_()
    p.grad = torch.randn_like(p) if grad is None else grad
    return p


@pytest.mark.parametrize("make,why", [
    (lambda: _param_with_grad(torch.randn(6, 4).t()), "contiguous dense tensors, not strided"),
    (lambda: _param_with_grad(torch.randn(5, dtype=torch.complex64)), "not torch.complex64"),
])
def test_what_the_kernels_cannot_take_goes_to_torch_or_raises(make, why):
    auto = optim.Adam([make()])
    auto.step()
    assert auto.backends_used() == {"torch"}
    explicit = optim.Adam([make()], backend="cpu")
    with pytest.raises(BackendUnavailableError, match=why):
        explicit.step()


def test_differentiable_goes_to_torch():
    p = _param_with_grad(torch.randn(5))
    with pytest.raises(BackendUnavailableError, match="differentiable=True"):
        optim.Adam([p], differentiable=True, backend="cpu").step()


def test_groups_that_differ_in_amsgrad_and_maximize_match_torch():
    """Per-call switches split a bucket into runs; amsgrad's maxima list is indexed on its own."""
    init = _tensors((7, 300, 2, 64), torch.float32, 0)
    grads = [_tensors((7, 300, 2, 64), torch.float32, 10 + k) for k in range(4)]

    def groups(params):
        return [{"params": params[:1], "amsgrad": True}, {"params": params[1:2]},
                {"params": params[2:3], "amsgrad": True, "maximize": True}, {"params": params[3:]}]

    results = []
    for make in (lambda ps: torch.optim.Adam(groups(ps), weight_decay=0.1),
                 lambda ps: optim.Adam(groups(ps), weight_decay=0.1, backend="cpu")):
        params = [p.clone().requires_grad_() for p in init]
        opt = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        results.append((params, opt))
    (ref_params, ref), (params, ours) = results
    assert ours.backends_used() == {"cpu"}
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r)
        for key, value in ref.state[r].items():
            torch.testing.assert_close(ours.state[p][key], value.to(ours.state[p][key].dtype))


def test_without_the_extension_the_backend_says_why():
    import subprocess
    import sys

    code = ("import recap_kernels, torch; ok, why = recap_kernels.available_backends()['cpu']; "
            "assert not ok and 'RECAP_KERNELS_SKIP_EXTENSION=1' in why, why; "
            "p = torch.zeros(3, requires_grad=True); p.grad = torch.ones(3); "
            "opt = recap_kernels.optim.Adam([p]); opt.step(); assert opt.backends_used() == {'torch'}")
    env = {**__import__("os").environ, "RECAP_KERNELS_SKIP_EXTENSION": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# -- bound buckets: gather + step on a BoundBucket, and the backend's BoundBucket per plan (Note [Bound buckets]) ----


def _step_grads(sizes, dtype, steps, seed=20):
    return [_tensors(sizes, dtype, seed + k, 0.1) for k in range(steps)]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("amsgrad,decoupled", [(False, False), (True, False), (False, True), (True, True)])
def test_adam_bound_bucket_is_the_list_op_to_the_bit_over_steps(dtype, amsgrad, decoupled):
    """Same object, new gradients each step (one a found_inf skip, one unscaled): the list op's results."""
    sizes = (5, 40, 3, 700, 1, 0, 64, 9)
    group_sizes = [2, 4, 2]
    hyper = adam_hyper([1e-3, 0.0, 3e-3], [0.9, 0.8, 0.95], [0.999, 0.99, 0.9], [1e-8, 1e-6, 1e-7], [0.0, 0.1, 0.01])
    lr_tensors = [None, torch.tensor(2e-3), None]
    state = _adam_state(sizes, dtype, amsgrad)
    listed, bound_state = _clone(state), _clone(state)
    params, _, exp_avgs, exp_avg_sqs, maxima, steps = bound_state
    bucket = _ops.bound_bucket(params, [exp_avgs, exp_avg_sqs] + ([maxima] if amsgrad else []), steps, group_sizes)
    assert len(bucket) == len(sizes)
    amp = {1: (torch.tensor(4.0), torch.tensor(1.0)), 2: (torch.tensor(4.0), torch.tensor(0.0))}
    for k, grads in enumerate(_step_grads(sizes, dtype, 4)):
        listed[1], bound_grads = [g.clone() for g in grads], [g.clone() for g in grads]
        grad_scale, found_inf = amp.get(k, (None, None))
        _ops.fused_adam_(*listed, group_sizes, hyper, lr_tensors, amsgrad=amsgrad, decoupled=decoupled,
                         maximize=False, grad_scale=grad_scale, found_inf=found_inf)
        _set_grads(params, bound_grads)
        assert bucket.gather() == 0, bucket.change()
        bucket.adam_step(hyper, lr_tensors, amsgrad, decoupled, False, grad_scale, found_inf)
        bound_state[1] = bound_grads
        for name, got, expected in zip(("params", "grads", "exp_avgs", "exp_avg_sqs", "maxima", "steps"),
                                       bound_state, listed):
            _assert_bitwise(got, expected, f"step {k} {name}")
    assert [s.item() for s in steps] == [3.0 + i + 3 for i in range(len(sizes))]  # 4 steps, one skipped


def test_adagrad_bound_bucket_is_the_list_op_to_the_bit_over_steps():
    sizes = (5, 40, 3, 700, 1, 64)
    group_sizes = [3, 3]
    hyper = adagrad_hyper([1e-2, 3e-2], [0.0, 0.01], [1e-10, 1e-8], [0.0, 0.1])
    init = [_tensors(sizes, torch.float32, 0), None, _tensors(sizes, torch.float32, 2, positive=True),
            [torch.tensor(float(i)) for i in range(len(sizes))]]
    listed = [[t.clone() for t in ts] if ts else ts for ts in init]
    ours = [[t.clone() for t in ts] if ts else ts for ts in init]
    bucket = _ops.bound_bucket(ours[0], [ours[2]], ours[3], group_sizes)
    for k, grads in enumerate(_step_grads(sizes, torch.float32, 4)):
        amp = {"grad_scale": torch.tensor(2.0), "found_inf": torch.tensor(float(k == 2))}
        listed[1], ours[1] = [g.clone() for g in grads], [g.clone() for g in grads]
        _ops.fused_adagrad_(*listed, group_sizes, hyper, [None, None], maximize=k == 3, **amp)
        _set_grads(ours[0], ours[1])
        assert bucket.gather() == 0, bucket.change()
        bucket.adagrad_step(hyper, [None, None], k == 3, amp["grad_scale"], amp["found_inf"])
        for got, expected in zip(ours, listed):
            _assert_bitwise(got, expected, f"adagrad step {k}")


def _small_bucket():
    params, grads, exp_avgs, exp_avg_sqs, maxima, steps, sizes, hyper, lr_tensors = _small_adam_args()
    _set_grads(params, grads)
    return _ops.bound_bucket(params, [exp_avgs, exp_avg_sqs, maxima], steps, sizes), params, (exp_avgs, exp_avg_sqs,
                                                                                            maxima, steps)


CHANGES = {
    "gradient gone": (lambda ps, st: setattr(ps[1], "grad", None), r"params\[1\]: the parameter has no gradient"),
    "gradient dtype": (lambda ps, st: setattr(ps[0].grad, "data", ps[0].grad.double()), "gradient"),
    "gradient shape": (lambda ps, st: setattr(ps[0].grad, "data", ps[0].grad.view(5, 1)), "gradient"),
    "gradient strided": (lambda ps, st: setattr(ps[0], "grad", torch.randn(10)[::2]), "gradient"),
    "parameter storage": (lambda ps, st: setattr(ps[1], "data", ps[1].data.clone()), r"params\[1\]: the parameter"),
    "parameter dtype": (lambda ps, st: setattr(ps[0], "data", ps[0].data.double()), "the parameter"),
    "state storage": (lambda ps, st: setattr(st[0][1], "data", st[0][1].clone()), "a state tensor"),
    "state resized": (lambda ps, st: st[2][0].resize_(7), "a state tensor"),
    "step storage": (lambda ps, st: setattr(st[3][0], "data", torch.zeros(())), "the step counter"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_gather_reports_every_change_and_writes_nothing(change):
    bucket, params, state = _small_bucket()
    assert bucket.gather() == 0
    mutate, message = CHANGES[change]
    mutate(params, state)
    before = [t.clone() for t in (*params, *state[0], *state[1], *state[3])]
    code = bucket.gather()
    assert code != 0
    assert re.search(message, bucket.change()), bucket.change()
    with pytest.raises(RuntimeError, match="needs a successful gather"):
        bucket.adam_step(*_small_adam_args()[7:9], True, False, False, None, None)
    after = [t for t in (*params, *state[0], *state[1], *state[3])]
    for a, b in zip(before, after):
        assert a.dtype != b.dtype or a.shape != b.shape or torch.equal(a, b)


def test_bound_bucket_steps_once_per_gather_and_checks_its_states():
    bucket, params, state = _small_bucket()
    hyper, lr_tensors = _small_adam_args()[7:9]
    with pytest.raises(RuntimeError, match="needs a successful gather"):
        bucket.adam_step(hyper, lr_tensors, True, False, False, None, None)
    assert bucket.gather() == 0
    with pytest.raises(RuntimeError, match=r"adam_step\(amsgrad=0\) takes a BoundBucket with 2 state lists"):
        bucket.adam_step(hyper, lr_tensors, False, False, False, None, None)
    with pytest.raises(RuntimeError, match="adagrad_step takes a BoundBucket with 1 state list"):
        bucket.adagrad_step([1e-2, 0.0, 1e-10, 0.0] * 2, [None, None], False, None, None)
    with pytest.raises(RuntimeError, match="lr_tensors\\[1\\] must have one element"):
        bucket.adam_step(hyper, [None, torch.tensor([1.0, 2.0])], True, False, False, None, None)
    versions = [p._version for p in params]
    bucket.adam_step(hyper, lr_tensors, True, False, False, None, None)
    assert [p._version for p in params] == [v + 1 for v in versions], "Note [Version counters]"
    assert [s.item() for s in state[3]] == [4.0, 5.0]
    with pytest.raises(RuntimeError, match="needs a successful gather"):
        bucket.adam_step(hyper, lr_tensors, True, False, False, None, None)


def test_bound_bucket_addresses_are_the_pointer_table():
    bucket, params, state = _small_bucket()
    assert bucket.gather() == 0
    table = bucket.addresses()
    exp_avgs, exp_avg_sqs, maxima, steps = state
    rows = [params, [p.grad for p in params], exp_avgs, exp_avg_sqs, maxima, steps]
    assert table.tolist() == [[t.data_ptr() for t in row] for row in rows]
    assert bucket.grad_addresses().tolist() == [p.grad.data_ptr() for p in params]


def _optimizer_run(make, init, grads_per_step, between=None):
    """Steps an optimizer of ``make(params)`` through the gradients; ``between(k, opt, params)`` before step k."""
    params = [p.clone().requires_grad_() for p in init]
    opt = make(params)
    for k, grads in enumerate(grads_per_step):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        if between is not None:
            between(k, opt, params)
        opt.step()
    return params, opt


def _assert_same_optimizers(a, b):
    (params_a, opt_a), (params_b, opt_b) = a, b
    _assert_bitwise(params_a, params_b, "params")
    for p, q in zip(params_a, params_b):
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        for key, value in opt_a.state[p].items():
            _assert_bitwise([value], [opt_b.state[q][key]], f"state {key}")


def _counting_builds(monkeypatch):
    from recap_kernels.backends import native

    builds = []
    build = _ops.bound_bucket

    def counting(*args):
        builds.append(len(args[0]))
        return build(*args)

    monkeypatch.setattr(_ops, "bound_bucket", counting)
    return native, builds


OPTIMIZER_CASES = {
    "adam": lambda ps: optim.Adam(ps, backend="cpu", weight_decay=0.1),
    "adam-amsgrad": lambda ps: optim.Adam(ps, backend="cpu", amsgrad=True, maximize=True),
    "adamw": lambda ps: optim.AdamW(ps, backend="cpu", lr=torch.tensor(3e-3)),
    "adamw-groups": lambda ps: optim.AdamW([{"params": ps[:2], "amsgrad": True}, {"params": ps[2:3]},
                                            {"params": ps[3:], "lr": 1e-2, "betas": (0.8, 0.9)}], backend="cpu"),
    "adagrad": lambda ps: optim.Adagrad(ps, backend="cpu", lr_decay=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_a_step_through_bound_buckets_is_the_list_step_to_the_bit(case, monkeypatch):
    """Several steps, an AMP step that found an inf (skipped) and one it unscales: bound == list, bit for bit."""
    init = _tensors((7, 300, 2, 64, 1), torch.float32, 0)
    grads = _step_grads((7, 300, 2, 64, 1), torch.float32, 6)

    def amp(k, opt, params):
        for name in ("grad_scale", "found_inf"):
            opt.__dict__.pop(name, None)
        if k in (2, 4):  # what GradScaler.step hands an optimizer with _step_supports_amp_scaling
            opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(float(k == 2))

    steps, builds = _counting_builds(monkeypatch)
    monkeypatch.setattr(steps, "bind_buckets", False)
    listed = _optimizer_run(OPTIMIZER_CASES[case], init, grads, amp)
    assert builds == []
    monkeypatch.setattr(steps, "bind_buckets", True)
    bound = _optimizer_run(OPTIMIZER_CASES[case], init, grads, amp)
    assert bound[1].backends_used() == {"cpu"}
    runs = 2 if case == "adamw-groups" else 1  # amsgrad splits the groups into two runs: one object each
    assert len(builds) == runs, "one BoundBucket per run, built on the first step and kept by the plan"
    _assert_same_optimizers(bound, listed)
    assert [bound[1].state[p]["step"].item() for p in bound[0]] == [5.0] * 5


def test_a_replan_builds_new_bound_buckets_with_the_new_tensors(monkeypatch):
    """load_state_dict (new state tensors) and a gradient that comes and goes each make a new plan: the
    objects built for the old plan, with the old tensors, must not be used again."""
    init = _tensors((7, 300, 2, 64), torch.float32, 0)
    grads = _step_grads((7, 300, 2, 64), torch.float32, 8)
    grads[4][1] = None  # parameter 1 sits out steps 4 and 5
    grads[5][1] = None
    donor_params = [p.clone().requires_grad_() for p in init]
    donor = optim.Adam(donor_params, amsgrad=True, backend="cpu")
    for g in _step_grads((7, 300, 2, 64), torch.float32, 3, seed=90):
        for p, t in zip(donor_params, g):
            p.grad = t
        donor.step()
    saved = donor.state_dict()

    def between(k, opt, params):
        if k == 2:
            opt.load_state_dict(copy.deepcopy(saved))  # load_state_dict keeps the tensors it is given

    steps, builds = _counting_builds(monkeypatch)
    make = lambda ps: optim.Adam(ps, amsgrad=True, backend="cpu")  # noqa: E731
    monkeypatch.setattr(steps, "bind_buckets", False)
    listed = _optimizer_run(make, init, grads, between)
    monkeypatch.setattr(steps, "bind_buckets", True)
    bound = _optimizer_run(make, init, grads, between)
    # Plans: steps 0-1, after load_state_dict 2-3, without parameter 1 4-5; with it again (6-7) the
    # optimizer goes back to the plan of steps 2-3, which it kept (recent plans are cached).
    assert builds == [4, 4, 3]
    _assert_same_optimizers(bound, listed)
    assert bound[1].state[bound[0][0]]["step"].item() == 3 + 6
    assert bound[1].state[bound[0][1]]["step"].item() == 3 + 4


def test_a_compiled_step_matches_eager(monkeypatch):
    """Under torch.compile the step is one op that runs the eager step (Note [Compiled steps]): the same
    plans and bound buckets, the same numbers."""
    import torch._dynamo

    init = _tensors((17, 4, 300), torch.float32, 0)
    grads = _step_grads((17, 4, 300), torch.float32, 4)
    _, builds = _counting_builds(monkeypatch)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    results = []
    for compiled in (False, True):
        params = [p.clone().requires_grad_() for p in init]
        opt = optim.AdamW(params, lr=torch.tensor(1e-2), amsgrad=True, backend="cpu")
        step = opt.step
        for k, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            step()
            if k == 0 and compiled:
                torch._dynamo.reset()
                step = torch.compile(opt.step, backend=backend, fullgraph=True)
        results.append((params, opt))
    assert builds == [3, 3], "one BoundBucket per plan, compiled or not"
    ops = [node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert ops == [torch.ops.recap_kernels.optimizer_step]
    _assert_same_optimizers(*results)


@pytest.mark.skipif(not available_backends("cpu")["cpu"][0], reason="cpu backend unavailable")
def test_compiled_step_is_one_graph_without_recompiles_when_lr_changes():
    import torch._dynamo

    params = [torch.randn(n).requires_grad_() for n in (5, 300)]
    opt = optim.Adam(params, lr=torch.tensor(0.01), backend="cpu")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # eager first step: creating the state would otherwise recompile once
    compiled = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            compiled()
            opt.param_groups[0]["lr"].fill_(0.01 / (i + 2))  # what a scheduler does to a Tensor lr
    assert opt.backends_used() == {"cpu"}
    assert all(opt.state[p]["step"].item() == 4 for p in params)
