"""The C++ update math (csrc/include/recap_kernels/) on edge values, driven through the CPU ops.

The CUDA kernels include the same headers, so these run the GPU's formulas on a CPU-only machine:
every bfloat16/float16 bit pattern through the loads and stores, huge and tiny gradients, eps near
the denormals, lr 0, the bias corrections of step 1 and step 10^6, and inf/NaN gradients, which
must propagate exactly as in torch (or change nothing under found_inf).
"""

from __future__ import annotations

import pytest
import torch

from recap_kernels import available_backends

CPU_OK, CPU_WHY = available_backends("cpu")["cpu"]
pytestmark = pytest.mark.skipif(not CPU_OK, reason=f"cpu backend unavailable: {CPU_WHY}")

if CPU_OK:
    from recap_kernels import _ops

HALF_TYPES = [torch.bfloat16, torch.float16]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, except that any NaN matches any NaN (payloads differ between converters)."""
    nan = a.isnan()
    return bool(torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan]))


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_every_16_bit_pattern_widens_exactly(dtype):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    out = torch.empty(values.shape, dtype=torch.float32)
    _ops.convert_(out, values)
    assert _same(out, values.float())
    back = torch.empty_like(values)
    _ops.convert_(back, out)  # and narrows back to itself: widening is exact
    assert _same(back.float(), values.float())


def _hard_floats() -> torch.Tensor:
    """Values that stress rounding: ties, the overflow edge, subnormals of both targets, specials."""
    gen = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32)
    # Every float32 whose low 16 bits are a tie (0x8000) or one off it, over a range of exponents.
    high = torch.arange(0, 2**16, 7, dtype=torch.int64) << 16
    ties = torch.cat([high | 0x8000, high | 0x7FFF, high | 0x8001, high | 0x1000]).to(torch.int64)
    ties = torch.where(ties >= 2**31, ties - 2**32, ties).to(torch.int32)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65519.99, 65520.0,
                             65536.0, 1e30, -1e30, 6.1035156e-05, 6.0e-08, 5.96e-08, 2.98e-08, 2.99e-08,
                             1e-45, 1.1754942e-38, 3.3895314e38, 3.4028235e38], dtype=torch.float32)
    return torch.cat([random_bits.view(torch.float32), ties.view(torch.float32), specials])


@pytest.mark.parametrize("dtype", HALF_TYPES + [torch.float64], ids=str)
def test_float32_narrows_like_tensor_to(dtype):
    src = _hard_floats()
    out = torch.empty(src.shape, dtype=dtype)
    _ops.convert_(out, src)
    assert _same(out.float() if dtype != torch.float64 else out, src.to(dtype).float() if dtype != torch.float64
                 else src.double())


def _adam_once(dtype, p, g, *, lr=1e-3, eps=1e-8, step=0.0, weight_decay=0.0, amsgrad=False, found_inf=None,
               grad_scale=None, m=None, v=None):
    """One step of ours and of torch's fused CPU kernel on copies of the same tensors."""
    p, g = p.to(dtype), g.to(dtype)
    m = torch.zeros_like(p) if m is None else m.to(dtype)
    v = torch.zeros_like(p) if v is None else v.to(dtype)
    results = []
    for impl in ("ours", "torch"):
        tensors = [p.clone(), g.clone(), m.clone(), v.clone(), [v.clone()] if amsgrad else []]
        steps = [torch.tensor(step)]
        if impl == "ours":
            _ops.fused_adam_([tensors[0]], [tensors[1]], [tensors[2]], [tensors[3]], tensors[4], steps, [1],
                             [lr, 0.9, 0.999, eps, weight_decay], [None], amsgrad=amsgrad, decoupled=False,
                             maximize=False, grad_scale=grad_scale, found_inf=found_inf)
        else:
            if found_inf is None or found_inf.item() == 0:
                steps[0] += 1
            torch._fused_adam_([tensors[0]], [tensors[1]], [tensors[2]], [tensors[3]], tensors[4], steps, lr=lr,
                               beta1=0.9, beta2=0.999, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
                               maximize=False, grad_scale=grad_scale, found_inf=found_inf)
        results.append(tensors[:4] + tensors[4] + steps)
    return results


def _assert_same_as_torch(ours, ref):
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert _same(a, b), f"tensor {i}: ours {a} vs torch {b}"


# A vector's worth of each edge value (64 elements: torch's vector loop on AVX2 and AVX-512).
def _filled(values, n=64):
    values = torch.tensor(values, dtype=torch.float64)
    return values.repeat(n // len(values) + 1)[:n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", ["huge-grads", "tiny-grads", "denormal-eps", "lr-0", "step-1", "step-1e6",
                                  "inf-nan-grads", "l2-huge-param", "amsgrad-nan"])
def test_adam_edge_values_match_torch(dtype, case):
    p = _filled([1.0, -2.0, 0.5, 3.0e-3, -7.0, 100.0, -0.25, 1e-4])
    g = _filled([0.1, -0.3, 2.0, -1e-3, 0.7, -5.0, 1e-2, 3.0])
    kwargs = {}
    if case == "huge-grads":
        g = g * (1e30 if dtype in (torch.float32, torch.float64) else 1e4)  # v overflows to inf in fp32
    elif case == "tiny-grads":
        g = g * (1e-30 if dtype in (torch.float32, torch.float64) else 1e-6)  # g * g underflows
    elif case == "denormal-eps":
        kwargs["eps"] = 1e-45 if dtype != torch.float64 else 5e-324
    elif case == "lr-0":
        kwargs["lr"] = 0.0
    elif case == "step-1":
        kwargs["step"] = 0.0  # the stored counter: this is step 1, bias corrections 1 - beta
    elif case == "step-1e6":
        kwargs["step"] = 1e6 - 1  # bias corrections 1 - beta ** 1e6 == 1
    elif case == "inf-nan-grads":
        g[::3] = float("inf")
        g[1::5] = float("nan")
        g[2::7] = -float("inf")
    elif case == "l2-huge-param":
        p[::4] = float("inf")
        kwargs["weight_decay"] = 0.1
    elif case == "amsgrad-nan":
        g[::9] = float("nan")
        kwargs["amsgrad"] = True
        kwargs["v"] = _filled([1e-4, 2.0, 0.0])
    ours, ref = _adam_once(dtype, p, g, **kwargs)
    _assert_same_as_torch(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inf_grad_under_found_inf_changes_nothing(dtype):
    p = _filled([1.0, -2.0, 0.5])
    g = _filled([float("inf"), 1.0, float("nan")])
    ours, ref = _adam_once(dtype, p, g, found_inf=torch.tensor(1.0), grad_scale=torch.tensor(8.0), step=4.0)
    _assert_same_as_torch(ours, ref)
    assert _same(ours[0], p.to(dtype)) and ours[-1].item() == 4.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["huge-grads", "tiny-grads", "denormal-eps", "lr-0", "inf-nan-grads", "lr-decay-1e6"])
def test_adagrad_edge_values_match_torch(dtype, case):
    p = _filled([1.0, -2.0, 0.5, 3.0e-3, -7.0, 100.0, -0.25, 1e-4]).to(dtype)
    g = _filled([0.1, -0.3, 2.0, -1e-3, 0.7, -5.0, 1e-2, 3.0])
    lr, eps, lr_decay, step = 0.01, 1e-10, 0.0, 0.0
    if case == "huge-grads":
        g = g * (1e25 if dtype == torch.float32 else 1e3)
    elif case == "tiny-grads":
        g = g * (1e-30 if dtype == torch.float32 else 1e-6)
    elif case == "denormal-eps":
        eps = 1e-45
    elif case == "lr-0":
        lr = 0.0
    elif case == "inf-nan-grads":
        g[::3] = float("inf")
        g[1::5] = float("nan")
    elif case == "lr-decay-1e6":
        lr_decay, step = 0.5, 1e6 - 1
    g = g.to(dtype)
    results = []
    for impl in ("ours", "torch"):
        tensors = [p.clone(), g.clone(), torch.full_like(p, 0.1), torch.tensor(step)]
        if impl == "ours":
            _ops.fused_adagrad_([tensors[0]], [tensors[1]], [tensors[2]], [tensors[3]], [1], [lr, lr_decay, eps, 0.0],
                                [None], maximize=False)
        else:
            tensors[3] += 1
            torch._fused_adagrad_([tensors[0]], [tensors[1]], [tensors[2]], [tensors[3]], lr=lr, lr_decay=lr_decay,
                                  weight_decay=0.0, eps=eps, maximize=False)
        results.append(tensors)
    _assert_same_as_torch(*results)
