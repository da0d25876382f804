"""The CUDA kernels (csrc/cuda/) and the ``cuda`` backend.

On a machine without a GPU (CI) the extension is still compiled with its CUDA kernels when torch is
a CUDA build and nvcc is there: these tests then check the ops have CUDA kernels under the same
schemas, the kernels' argument checks, the backend's availability and arch logic, and run the CUDA
kernels' code itself through its host emulation (csrc/cuda/emulate.cu: every block and thread of a
launch in turn, on CPU tensors) against torch.optim with the shared harness. The ``gpu`` tests run
the kernels: the shared equivalence harness (full matrix, in test_equivalence.py), a 300-tensor
bucket, more param groups than one launch takes, misaligned views, a tensor of more than 2^31
elements, CUDA-graph capture, GradScaler with an overflow step, and agreement with the Triton
backend.
"""

from __future__ import annotations

import pytest
import torch

from recap_kernels import _ext, _ops, _torch_numerics, available_backends, optim
from recap_kernels.backends import BackendUnavailableError, native
from tests.reference import (
    OPTION_MATRIX,
    AdagradBitsCase,
    adagrad_hyper,
    adam_hyper,
    assert_optimizer_close,
    assert_same_adagrad_bits,
    check_equivalence,
    fused_cuda_hyperparameters,
    make_grads,
    make_params,
    tolerances,
    torch_cuda_fused_adagrad,
    torch_cuda_opmath_adam,
    train,
)

LOADED = _ext.load()[0] is not None
BUILT_WITH_CUDA = bool(_ext.build_info().get("cuda_extension")) and LOADED
needs_cuda_build = pytest.mark.skipif(not BUILT_WITH_CUDA, reason="recap_kernels._C was built without CUDA kernels")
OPS = ("fused_adam_", "fused_adagrad_")
OPTIONS = {o.id: o for o in OPTION_MATRIX}
# Adam hyperparameters fp32 represents exactly: torch's fused CUDA Adam and ours compute with them
# rounded to fp32, torch's other paths in double (reference.rounded_hyperparameters).
EXACT_ADAM = {"betas": (0.875, 1 - 2.0**-10), "eps": 2.0**-20}


# ------------------------------------------------------------------------------------------------
# Without a GPU: the build, the schemas, the argument checks, the backend's verdicts
# ------------------------------------------------------------------------------------------------
@needs_cuda_build
@pytest.mark.parametrize("op", OPS)
def test_every_op_has_cpu_and_cuda_kernels_under_one_schema(op):
    qualified = f"recap_kernels::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA")
    assert len(getattr(torch.ops.recap_kernels, op).overloads()) == 1


@needs_cuda_build
def test_build_records_archs_and_the_torch_cuda_order_it_compiled():
    info = _ext.build_info()
    assert info["cuda_archs"], "setup.py records TORCH_CUDA_ARCH_LIST"
    assert "--fmad=false" in info["nvcc_flags"]
    assert info["cuda_adam_order"] == ("opmath" if _torch_numerics.torch_cuda_adam_opmath() else "double")


@needs_cuda_build
def test_build_records_the_torch_cuda_adagrad_order_it_compiled():
    """torch >= 2.12 has a fused CUDA Adagrad, whose order the CUDA Adagrad then follows; older torch the CPU one."""
    info = _ext.build_info()
    fused = _torch_numerics.torch_cuda_fused_adagrad()
    assert info["cuda_adagrad_order"] == ("torch-cuda" if fused else "cpu")
    assert f"-DRECAP_KERNELS_TORCH_CUDA_FUSED_ADAGRAD={int(fused)}" in info["nvcc_flags"]


def test_torch_cuda_fused_adagrad_follows_the_header_or_the_version(monkeypatch):
    monkeypatch.setattr(_torch_numerics, "fused_adagrad_header", lambda: None)
    for version, fused in (("2.11.0+cu128", False), ("2.12.0", True), ("3.0.1", True)):
        monkeypatch.setattr(torch, "__version__", version)
        assert _torch_numerics.torch_cuda_fused_adagrad() is fused
    monkeypatch.setattr(_torch_numerics, "fused_adagrad_header", lambda: "struct FusedAdagradMathFunctor {};")
    monkeypatch.setattr(torch, "__version__", "2.11.0")
    assert _torch_numerics.torch_cuda_fused_adagrad()


# The arithmetic of torch's adagrad_math and FusedAdagradMathFunctor that reference.torch_cuda_fused_adagrad
# transcribes (Note [CUDA Adagrad order] in adagrad_math.h), as the header spells it.
TRANSCRIBED_ADAGRAD_LINES = (
    "const double lr_double = lr_ptr ? *lr_ptr : lr;",
    "if (found_inf_ptr && *found_inf_ptr == 1) {",
    "const auto denom = 1 + (*step_count - 1) * lr_decay;",
    "const auto corrected_lr = lr_double / denom;",
    "opmath_t param = static_cast<opmath_t>(r_args[kParamIdx][ii]);",
    "grad /= (static_cast<double>(*grad_scale_ptr));",
    "const opmath_t grad_to_store = grad;",
    "grad = -grad;",
    "if (weight_decay != 0) {",
    "grad += param * weight_decay;",
    "state_sum += grad * grad;",
    "param = param - corrected_lr * grad / (std::sqrt(state_sum) + eps);",
)


@pytest.mark.skipif(_torch_numerics.fused_adagrad_header() is None,
                    reason="the installed torch ships no fused_adagrad_utils.cuh")
def test_the_transcribed_torch_cuda_adagrad_is_the_installed_one():
    """A torch that changes its fused CUDA Adagrad's arithmetic fails here, not silently in the last bits."""
    header = " ".join(_torch_numerics.fused_adagrad_header().split())
    missing = [line for line in TRANSCRIBED_ADAGRAD_LINES if line not in header]
    assert not missing, f"torch's fused_adagrad_utils.cuh changed: update Note [CUDA Adagrad order] ({missing})"


def _adam_args(n=3, dtype=torch.float32):
    params = [torch.randn(5 + i, dtype=dtype) for i in range(n)]
    return dict(
        params=params,
        grads=[torch.randn_like(p) for p in params],
        exp_avgs=[torch.rand_like(p) for p in params],
        exp_avg_sqs=[torch.rand_like(p) for p in params],
        max_exp_avg_sqs=[],
        state_steps=[torch.tensor(1.0) for _ in params],
        group_sizes=[n],
        hyper=adam_hyper([1e-3], [0.9], [0.999], [1e-8], [0.0]),
        lr_tensors=[None],
    )


def _adagrad_args(n=3):
    params = [torch.randn(5 + i) for i in range(n)]
    return dict(
        params=params,
        grads=[torch.randn_like(p) for p in params],
        state_sums=[torch.rand_like(p) for p in params],
        state_steps=[torch.tensor(1.0) for _ in params],
        group_sizes=[n],
        hyper=adagrad_hyper([1e-2], [0.0], [1e-10], [0.0]),
        lr_tensors=[None],
    )


def _call_cuda_kernel(op: str, args: dict, **flags):
    """Calls the op's CUDA kernel directly, whatever the tensors' device (what a caller reaching it
    with the wrong tensors would get)."""
    overload = getattr(torch.ops.recap_kernels, op).default
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    return overload.redispatch(keyset, *args.values(), **flags)


def _snapshot(args: dict) -> list[torch.Tensor]:
    return [t.clone() for v in args.values() if isinstance(v, list) for t in v if isinstance(t, torch.Tensor)]


def _assert_unchanged(args: dict, before: list[torch.Tensor]) -> None:
    after = [t for v in args.values() if isinstance(v, list) for t in v if isinstance(t, torch.Tensor)]
    for a, b in zip(after, before, strict=True):
        assert torch.equal(a, b), "a call that raised changed a tensor"


ADAM_FLAGS = {"amsgrad": False, "decoupled": False, "maximize": False}


@needs_cuda_build
@pytest.mark.parametrize(
    "op,make,flags,mutate,message",
    [
        ("fused_adam_", _adam_args, ADAM_FLAGS, None, r"params\[0\] must be a CUDA tensor, got one on cpu"),
        ("fused_adagrad_", _adagrad_args, {"maximize": False}, None,
         r"params\[0\] must be a CUDA tensor, got one on cpu"),
        ("fused_adam_", _adam_args, ADAM_FLAGS, lambda a: a["grads"].pop(),
         r"grads must have one tensor per parameter \(3\), got 2"),
        ("fused_adam_", _adam_args, {**ADAM_FLAGS, "amsgrad": True}, None,
         r"max_exp_avg_sqs must have one tensor per parameter \(3\), got 0"),
        ("fused_adam_", _adam_args, ADAM_FLAGS, lambda a: a["hyper"].append(0.8),
         r"hyper must have 5 values per group \(lr, beta1, beta2, eps, weight_decay\) for 1 groups, got 6"),
        ("fused_adagrad_", _adagrad_args, {"maximize": False}, lambda a: a.update(group_sizes=[1, 2]),
         r"hyper must have 4 values per group \(lr, lr_decay, eps, weight_decay\) for 2 groups, got 4"),
    ],
    ids=["adam-cpu-tensors", "adagrad-cpu-tensors", "short-list", "amsgrad-without-max", "group-list",
         "group-sizes"],
)
def test_cuda_kernels_reject_bad_calls_before_touching_anything(op, make, flags, mutate, message):
    args = make()
    if mutate is not None:
        mutate(args)
    before = _snapshot(args)
    with pytest.raises(RuntimeError, match=message):
        _call_cuda_kernel(op, args, **flags)
    _assert_unchanged(args, before)


def test_cuda_backend_says_why_it_cannot_run_here():
    ok, reason = available_backends("cuda")["cuda"]
    if not torch.cuda.is_available():
        assert not ok
        assert reason in ("no CUDA device is available", native.CUDA._extension.reason)
    ok, reason = native.CUDA.available(torch.device("cpu"))
    assert not ok and "CUDA tensors, not cpu" in reason


def test_explicit_cuda_backend_on_cpu_tensors_raises_and_changes_nothing():
    p = torch.randn(7, requires_grad=True)
    p.grad = torch.randn(7)
    before = p.detach().clone()
    opt = optim.Adam([p], backend="cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert opt.state[p] == {} or opt.state[p]["step"].item() == 0


@pytest.mark.parametrize(
    "capability,archs,expected",
    [
        ((9, 0), ["8.0", "9.0+PTX"], True),  # H100/H200: sm_90 machine code
        ((8, 0), ["8.0", "9.0+PTX"], True),  # A100
        ((8, 9), ["8.0", "9.0+PTX"], True),  # L4: sm_80 code runs on 8.x
        ((7, 5), ["8.0", "9.0+PTX"], False),  # T4: older than everything built
        ((10, 0), ["8.0", "9.0+PTX"], True),  # Blackwell: the driver compiles the sm_90 PTX
        ((10, 0), ["8.0", "9.0"], False),  # no PTX, no code for 10.0
        ((9, 0), ["8.0"], False),  # sm_80 code does not run on 9.0
    ],
)
def test_arch_support_follows_cuda_compatibility_rules(capability, archs, expected):
    assert native.arch_supported(capability, archs) is expected


# ------------------------------------------------------------------------------------------------
# Without a GPU: the CUDA kernels' code, emulated on the host
# ------------------------------------------------------------------------------------------------
EMULATED = LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(
    "recap_kernels::_emulate_cuda_fused_adam_", "CPU")
needs_emulation = pytest.mark.skipif(not EMULATED, reason="recap_kernels._C was built without CUDA kernels")


@pytest.fixture(params=["list-ops", "bound-buckets"])
def emulated_cuda_kernels(request, monkeypatch):
    """The cpu backend's steps go through the CUDA kernels' host emulation: through the list ops, or
    through bound buckets that run the emulated kernels (BoundBucket.set_emulate_cuda)."""
    calls = []
    if request.param == "list-ops":
        def route(name):
            op = getattr(torch.ops.recap_kernels, f"_emulate_cuda_{name}").default

            def call(*args, **kwargs):
                calls.append(name)
                op(*args, **kwargs)

            return call

        monkeypatch.setattr(native, "bind_buckets", False)
        monkeypatch.setattr(_ops, "fused_adam_", route("fused_adam_"))
        monkeypatch.setattr(_ops, "fused_adagrad_", route("fused_adagrad_"))
        return calls

    build = _ops.bound_bucket

    class Emulated:
        """A BoundBucket whose steps run the emulated CUDA kernels, counted."""

        def __init__(self, *args):
            self.bucket = build(*args)
            self.bucket.set_emulate_cuda(True)

        def __getattr__(self, name):
            if name in ("adam_step", "adagrad_step"):
                calls.append(f"fused_{name.removesuffix('_step')}_")  # as the list ops are counted
            return getattr(self.bucket, name)

    monkeypatch.setattr(_ops, "bound_bucket", Emulated)
    return calls


EMULATED_CASES = [(o, d) for o in OPTION_MATRIX for d in (torch.float32, torch.float64)] + [
    (o, d) for o in OPTION_MATRIX if o.optimizer == "adagrad" for d in (torch.bfloat16, torch.float16)]


@needs_emulation
@pytest.mark.parametrize("options,dtype", EMULATED_CASES,
                         ids=[f"{o.id}-{str(d).removeprefix('torch.')}" for o, d in EMULATED_CASES])
def test_emulated_cuda_kernels_match_torch(emulated_cuda_kernels, options, dtype):
    """The full option matrix on odd sizes (1, 3, 4097, an empty tensor, a matrix), three groups,
    a parameter that skips steps: the CUDA kernels' blocks, run on the host. bf16/fp16 Adagrad, in
    torch's fused CPU order or its fused CUDA one (Note [CUDA Adagrad order]), matches torch's fused
    CPU step to one ulp; the CUDA Adam's low precision order is torch's CUDA one, checked on the GPU."""
    opt = check_equivalence("cpu", options, dtype, hyperparameters_in=fused_cuda_hyperparameters(options, dtype))
    assert opt.backends_used() == {"cpu"}
    assert emulated_cuda_kernels, "the steps went through the emulated CUDA kernels"


@needs_emulation
@pytest.mark.parametrize("family", ["Adam", "AdamW", "Adagrad"])
def test_emulated_two_launches_multi_chunk_tensors_and_misaligned_views(emulated_cuda_kernels, family):
    """40 groups (two launches of at most 32), tensors of one, two and three 65,536-element chunks,
    and contiguous views at odd offsets (no 128-bit path): same numbers as torch.optim."""
    sizes = [65_536, 65_537, 131_073, 7, 1, 4099] + [3 + 5 * i for i in range(74)]
    flat = torch.randn(sum(sizes) + len(sizes) + 8, dtype=torch.float64)

    def fresh():
        base = flat.clone().float()
        out, offset = [], 1
        for i, n in enumerate(sizes):
            view = base[offset:offset + n] if i % 4 == 3 else base[offset:offset + n].clone()  # every 4th misaligned
            out.append(view.requires_grad_())
            offset += n + 1
        return out

    def build(cls, params, **kw):
        # Hyperparameters fp32 represents exactly (see reference.rounded_hyperparameters).
        extra = {} if family == "Adagrad" else {"weight_decay": 2.0**-6, "amsgrad": family == "Adam",
                                                "betas": (0.875, 1 - 2.0**-10), "eps": 2.0**-20}
        return cls([{"params": params[2 * g:2 * g + 2], "lr": 2.0**-10 * (1 + g)} for g in range(40)], **extra, **kw)

    grads = make_grads(fresh(), 5)
    ref_params = fresh()
    ref = build(getattr(torch.optim, family), ref_params)
    train(ref, ref_params, grads)
    params = fresh()
    assert any(p.data_ptr() % 16 for p in params)
    opt = build(getattr(optim, family), params, backend="cpu")
    train(opt, params, grads)
    assert_optimizer_close(ref, ref_params, opt, params, torch.float32)
    assert len(emulated_cuda_kernels) == 5


@needs_emulation
@pytest.mark.parametrize("family", ["Adam", "Adagrad"])
def test_emulated_amp_unscales_in_kernel_and_an_overflow_changes_nothing(emulated_cuda_kernels, family):
    init = make_params([(4097,), (3,), (130,)], torch.float32)
    grads = make_grads(init, 3)
    params = [p.clone().requires_grad_() for p in init]
    opt = getattr(optim, family)(params, backend="cpu")
    train(opt, params, grads[:1])
    before = [p.detach().clone() for p in params], [dict((k, v.clone()) for k, v in opt.state[p].items())
                                                     for p in params]
    for p, g in zip(params, grads[1]):
        p.grad = None if g is None else g * 1024
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    opt.step()  # found_inf: nothing moves, step counters included
    for p, b, state in zip(params, before[0], before[1]):
        assert torch.equal(p.detach(), b)
        for k, v in state.items():
            assert torch.equal(opt.state[p][k], v)
    opt.found_inf = torch.tensor(0.0)
    opt.step()  # unscaled in the kernel, and the gradients are left unscaled
    del opt.grad_scale, opt.found_inf
    for p, g in zip(params, grads[1]):
        if g is not None:
            torch.testing.assert_close(p.grad, g)
    assert opt.state[params[0]]["step"].item() == 2


OPMATH_CASES = {
    "adam-amsgrad-wd": {"lr": 3e-3, "betas": (0.9, 0.999), "weight_decay": 0.05, "amsgrad": True},
    "adamw-amsgrad-maximize": {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.1, "amsgrad": True,
                               "maximize": True},
    "adam-lr-tensor-amp": {"lr": torch.tensor(2e-3), "betas": (0.9, 0.999), "eps": 1e-6},
}


@needs_emulation
@pytest.mark.skipif(_ext.build_info().get("cuda_adam_order") != "opmath", reason="built for torch's double order")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(OPMATH_CASES))
def test_emulated_cuda_adam_is_torch_fused_cuda_adam_bit_for_bit(emulated_cuda_kernels, case, dtype):
    """The CUDA Adam's arithmetic against a transcription of torch's fused CUDA kernel
    (reference.torch_cuda_opmath_adam): the same bits in every state, on the vector path and the
    tail (4,099 elements), with amsgrad, AdamW, maximize, a Tensor lr and AMP."""
    kwargs = OPMATH_CASES[case]
    decoupled, amp = case.startswith("adamw"), case.endswith("amp")
    (init,) = make_params([(4099,)], torch.float32, seed=3)
    grads = [step[0] for step in make_grads([init, init], 6)]
    scale = torch.tensor(1024.0)
    param = init.to(dtype, copy=True).requires_grad_()
    opt = (optim.AdamW if decoupled else optim.Adam)([param], backend="cpu", **kwargs)
    for g in grads:
        param.grad = (g * scale if amp else g).to(dtype)
        if amp:
            opt.grad_scale, opt.found_inf = scale, torch.tensor(0.0)
        opt.step()
    defaults = {"eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, "maximize": False}
    expected = torch_cuda_opmath_adam(init, [g * scale if amp else g for g in grads], dtype=dtype,
                                      decoupled=decoupled, grad_scale=scale if amp else None, **{**defaults, **kwargs})
    state = opt.state[param]
    actual = (param.detach(), state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"))
    for name, got, want in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), actual, expected):
        if got is not None:
            assert torch.equal(got, want), f"{name}: {(got.float() - want.float()).abs().max()}"
    assert emulated_cuda_kernels


def test_reference_fmas_round_once():
    """The transcriptions' FMAs (reference._fma64, _fma32) against rational arithmetic: one rounding."""
    from tests.reference import _fma32, _fma64, fma_operands

    a, b, c, exact = fma_operands(3000)
    assert _fma64(a, b, c).tolist() == exact
    assert (a * b + c).tolist() != exact  # rounding the product first is not the same
    # fp32: (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 is halfway between two floats; 2^-80 more rounds it up,
    # where the sum rounded to double first would round to even, down.
    x = torch.tensor([1 + 2.0**-12])
    assert _fma32(x, x, torch.tensor([2.0**-80])).item() == 1 + 2.0**-11 + 2.0**-23
    assert (x.double() * x.double() + 2.0**-80).float().item() == 1 + 2.0**-11


@needs_emulation
@pytest.mark.skipif(_ext.build_info().get("cuda_adagrad_order") != "torch-cuda",
                    reason="built for a torch without a fused CUDA Adagrad: the CUDA Adagrad keeps the CPU order")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", ["plain", "maximize", "amp-overflow"])
def test_emulated_cuda_adagrad_is_torch_fused_cuda_adagrad_bit_for_bit(emulated_cuda_kernels, case, dtype):
    """The CUDA Adagrad's arithmetic against a transcription of torch's fused CUDA kernel
    (reference.torch_cuda_fused_adagrad): the same bits in every parameter, sum, step counter and
    unscaled gradient after 16 steps, over three groups (float and Tensor lr, lr_decay, weight decay,
    eps, initial accumulator), odd sizes, a misaligned view and a parameter that skips steps; AMP
    with an overflow step. float64 pins down the double FMAs (Note [CUDA Adagrad order])."""
    data = AdagradBitsCase.make(dtype, sizes=((4099, 1027), (65_537, 3), (130, 1)), steps=16,
                                maximize=case == "maximize", amp=case == "amp-overflow")
    opt, got = data.run(lambda groups, **kw: optim.Adagrad(groups, backend="cpu", **kw), "cpu")
    assert_same_adagrad_bits(got, data.torch_cuda_fused_adagrad(), data.amp)
    assert opt.backends_used() == {"cpu"}
    assert emulated_cuda_kernels and set(emulated_cuda_kernels) == {"fused_adagrad_"}


@needs_emulation
@pytest.mark.skipif(_ext.build_info().get("cuda_adagrad_order") != "torch-cuda",
                    reason="built for a torch without a fused CUDA Adagrad: the CUDA Adagrad keeps the CPU order")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_emulated_cuda_adagrad_edge_values_are_torch_fused_cuda_adagrads(emulated_cuda_kernels, weight_decay, dtype):
    """inf, NaN, huge, tiny and zero gradients and parameters in the CUDA order: the transcription's
    values, NaN for NaN, after three steps (a weight decay of 0 skips the term, as torch does)."""
    big = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).tiny
    specials = [float("inf"), -float("inf"), float("nan"), big, -big, tiny, -tiny, 0.0, 1.0, -3.0]
    grid = torch.tensor([(p, g) for p in specials for g in specials], dtype=torch.float64).to(dtype)
    init, grad = grid[:, 0].contiguous(), grid[:, 1].contiguous()
    param = init.clone().requires_grad_()
    opt = optim.Adagrad([param], lr=0.5, lr_decay=0.1, weight_decay=weight_decay, eps=1e-10, backend="cpu")
    for _ in range(3):
        param.grad = grad.clone()
        opt.step()
    want_param, want_sum, _, _ = torch_cuda_fused_adagrad(init, [grad] * 3, dtype=dtype, lr=0.5, lr_decay=0.1,
                                                          weight_decay=weight_decay, eps=1e-10)
    for name, got, want in (("param", param.detach(), want_param), ("sum", opt.state[param]["sum"], want_sum)):
        nan = got.isnan()
        assert torch.equal(nan, want.isnan()) and torch.equal(got[~nan], want[~nan]), name
    assert emulated_cuda_kernels


# ------------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------------
CUDA_OK = torch.cuda.is_available() and available_backends("cuda")["cuda"].ok
needs_cuda_backend = pytest.mark.skipif(not CUDA_OK, reason=f"cuda backend: {available_backends('cuda')['cuda']}")

# A recap tower bucket: 300 tensors of odd sizes (biases, small matrices, a few wide layers).
TOWER_SHAPES = tuple((1 + (i * 37) % 517, 1 + (i * 11) % 63) if i % 3 else (1 + (i * 131) % 4099,)
                     for i in range(300))


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", ["adam-amsgrad-wd", "adamw-wd", "adam-lr-tensor", "adagrad-wd-maximize"])
def test_300_tensor_bucket_matches_torch(options, dtype):
    opt = check_equivalence("cuda", OPTIONS[options], dtype, device="cuda", shapes=TOWER_SHAPES, steps=10,
                            hyperparameters_in=fused_cuda_hyperparameters(OPTIONS[options], dtype))
    assert opt.backends_used() == {"cuda"}


def _kernel_launches(fn) -> dict[str, int]:
    """CUDA kernels ``fn`` launches, by name, from the profiler's trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            for kernel in ("adam_kernel", "adagrad_kernel", "advance_steps_kernel", "write_words_kernel"):
                if kernel in event.name:
                    counts[kernel] = counts.get(kernel, 0) + 1
    return counts


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("family,kernel", [("AdamW", "adam_kernel"), ("Adagrad", "adagrad_kernel")])
def test_a_step_of_300_tensors_in_11_groups_is_two_launches_and_uploads_nothing(family, kernel):
    """One update launch and one step-counter launch per step; the table is uploaded on the first
    step only, and again only when a gradient's address changes."""
    params = [p.requires_grad_() for p in make_params(TOWER_SHAPES, torch.float32, "cuda")]
    opt = getattr(optim, family)([{"params": params[i::11], "lr": 1e-3 * (i + 1)} for i in range(11)],
                                 backend="cuda")
    for p in params:
        p.grad = torch.randn_like(p)
    first = _kernel_launches(opt.step)
    assert first[kernel] == 1 and first["advance_steps_kernel"] == 1 and first.get("write_words_kernel", 0) >= 1
    for group in opt.param_groups:  # a scheduler's new learning rates travel as kernel arguments
        group["lr"] *= 0.5
    again = _kernel_launches(opt.step)
    assert again == {kernel: 1, "advance_steps_kernel": 1}, again
    params[5].grad = params[5].grad.clone()  # a new address: the table is uploaded again
    moved = _kernel_launches(opt.step)
    assert moved[kernel] == 1 and moved.get("write_words_kernel", 0) >= 1


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("family", ["Adam", "Adagrad"])
def test_more_groups_than_one_launch_takes(family):
    """40 groups, each with its own lr: two launches (kMaxLaunchGroups = 32), same numbers as torch."""
    init = make_params([(3 + 17 * i,) for i in range(80)], torch.float32, "cuda")
    grads = make_grads(init, 6)

    def build(cls, params, **kw):
        extra = {} if family == "Adagrad" else EXACT_ADAM
        return cls([{"params": params[2 * g:2 * g + 2], "lr": 2.0**-10 * (1 + g)} for g in range(40)], **extra, **kw)

    ref_params = [p.clone().requires_grad_() for p in init]
    ref = build(getattr(torch.optim, family), ref_params)
    train(ref, ref_params, grads)
    params = [p.clone().requires_grad_() for p in init]
    opt = build(getattr(optim, family), params, backend="cuda")
    train(opt, params, grads)
    assert_optimizer_close(ref, ref_params, opt, params, torch.float32)


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_misaligned_views_take_the_scalar_path_with_the_same_numbers(dtype):
    """Parameters that are contiguous views at odd offsets of a larger buffer (no 16-byte alignment)."""
    sizes = (1, 3, 4097, 65_537 + 5, 130)
    flat = torch.randn(sum(sizes) + 3 * len(sizes) + 8, dtype=torch.float64).to(dtype).cuda()

    def views(buffer):
        out, offset = [], 1
        for n in sizes:
            out.append(buffer[offset:offset + n])
            offset += n + 3
        return out

    grads = make_grads([torch.empty(n, dtype=dtype, device="cuda") for n in sizes], 8)
    ref_params = [v.clone().requires_grad_() for v in views(flat)]
    kw = {"weight_decay": 2.0**-4, **EXACT_ADAM}
    ref = torch.optim.Adam(ref_params, **kw, **({"fused": True} if dtype == torch.bfloat16 else {}))
    train(ref, ref_params, grads)
    params = [v.requires_grad_() for v in views(flat.clone())]
    assert all(p.data_ptr() % 16 != 0 for p in params)
    opt = optim.Adam(params, backend="cuda", **kw)
    train(opt, params, grads)
    assert_optimizer_close(ref, ref_params, opt, params, dtype)


@pytest.mark.gpu
@needs_cuda_backend
def test_a_tensor_of_more_than_2_31_elements():
    """64-bit tensor offsets: the elements past 2^31 are updated, and exactly as torch updates them."""
    n = 2**31 + 4099
    p = torch.randn(n, dtype=torch.bfloat16, device="cuda").requires_grad_()
    p.grad = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    head, tail = slice(0, 4099), slice(n - 70_000, n)  # the tail spans the 2^31 boundary of chunk offsets
    ref_params = [p.detach()[head].clone().requires_grad_(), p.detach()[tail].clone().requires_grad_()]
    for r, s in zip(ref_params, (head, tail)):
        r.grad = p.grad[s].clone()
    ref = torch.optim.Adam(ref_params, fused=True)
    opt = optim.Adam([p], backend="cuda")
    for _ in range(2):
        ref.step()
        opt.step()
    for r, s in zip(ref_params, (head, tail)):
        torch.testing.assert_close(p.detach()[s], r.detach(), **tolerances(torch.bfloat16))
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"][s], ref.state[r]["exp_avg_sq"],
                                   **tolerances(torch.bfloat16))


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("family,kwargs", [("Adam", {"amsgrad": True, "weight_decay": 0.1}),
                                           ("AdamW", {"weight_decay": 0.1}),
                                           ("Adagrad", {"lr_decay": 0.01})])
def test_cuda_graph_capture_replays_like_eager_steps(family, kwargs):
    init = make_params([(1000,), (4097,), (3,), (65_537,)], torch.float32, "cuda")
    eager_params = [p.clone().requires_grad_() for p in init]
    graph_params = [p.clone().requires_grad_() for p in init]
    lr = torch.tensor(1e-3, device="cuda")
    cls = getattr(optim, family)
    extra = {} if family == "Adagrad" else {"capturable": True}
    eager = cls(eager_params, lr=lr.clone(), backend="cuda", **extra, **kwargs)
    captured = cls(graph_params, lr=lr, backend="cuda", **extra, **kwargs)
    grads = make_grads(init, 8)
    static_grads = [torch.zeros_like(p) for p in graph_params]
    for p, g in zip(graph_params, static_grads):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: state created, tables uploaded
        for g, s in zip(grads[0], static_grads):
            s.copy_(g if g is not None else torch.zeros_like(s))
        captured.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.step()
    # The eager twin sees the same gradients (zeros where the harness gives none: the graph's
    # static gradients always exist).
    dense = [[g if g is not None else torch.zeros_like(p) for g, p in zip(step, init)] for step in grads]
    train(eager, eager_params, dense[:1])
    for step_grads in dense[1:]:
        for g, s in zip(step_grads, static_grads):
            s.copy_(g)
        graph.replay()
        lr.mul_(0.9)  # a Tensor lr changed in place reaches the captured kernel
        train(eager, eager_params, [step_grads])
        for group in eager.param_groups:
            group["lr"].mul_(0.9)
    torch.cuda.synchronize()
    assert_optimizer_close(eager, eager_params, captured, graph_params, torch.float32)


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("family,kwargs", [("Adam", {"fused": True}), ("AdamW", {"fused": True, "amsgrad": True}),
                                           ("Adagrad", {"fused": True}), ("Adam", {})])
def test_grad_scaler_with_an_overflow_step_matches_torch(family, kwargs):
    init = make_params([(17,), (4, 5), (4097,)], torch.float32, "cuda")
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=gen).cuda() for p in init] for _ in range(6)]
    grads[3][1][2, 2] = float("inf")

    def run(cls, params, **kw):
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=2)
        opt = cls(params, lr=2.0**-7, **({} if family == "Adagrad" else EXACT_ADAM), **kw)
        for grad in grads:
            opt.zero_grad()
            loss = sum((p * g).sum() for p, g in zip(params, grad))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return opt, scaler

    # Adagrad's reference is torch's default (foreach) path: torch < 2.12 has no fused CUDA Adagrad (the
    # fused one is checked bit for bit in test_adagrad_is_torch_fused_cuda_adagrad_bit_for_bit_on_the_gpu).
    ref_kwargs = {} if family == "Adagrad" else kwargs
    ref_params = [p.clone().requires_grad_() for p in init]
    ref, ref_scaler = run(getattr(torch.optim, family), ref_params, **ref_kwargs)
    params = [p.clone().requires_grad_() for p in init]
    opt, scaler = run(getattr(optim, family), params, backend="cuda", **kwargs)
    assert scaler.get_scale() == ref_scaler.get_scale()
    assert_optimizer_close(ref, ref_params, opt, params, torch.float32)
    assert opt.state[params[0]]["step"].item() == 5


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.skipif(not available_backends("cuda")["triton"].ok if torch.cuda.is_available() else True,
                    reason="needs the triton backend on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", ["adam-amsgrad-wd", "adamw-amsgrad-maximize", "adagrad-lr-decay"])
def test_cuda_and_triton_backends_agree(options, dtype):
    init = make_params(TOWER_SHAPES[:40], dtype, "cuda")
    grads = make_grads(init, 10)
    runs = []
    for backend in ("cuda", "triton"):
        opt_options = OPTIONS[options]
        cls = {"adam": optim.Adam, "adamw": optim.AdamW, "adagrad": optim.Adagrad}[opt_options.optimizer]
        params = [p.clone().requires_grad_() for p in init]
        opt = cls(params, backend=backend, **opt_options.make_kwargs(dtype))
        train(opt, params, grads)
        runs.append((opt, params))
    (cuda_opt, cuda_params), (triton_opt, triton_params) = runs
    assert_optimizer_close(triton_opt, triton_params, cuda_opt, cuda_params, dtype)


@pytest.mark.gpu
@needs_cuda_backend
def test_sanitizer_case_odd_sizes_and_misaligned_views():
    """The case bench/gpu_check.sh runs under compute-sanitizer (memcheck): every path of the kernels
    (vector body, tails, misaligned slots, amsgrad, AMP, empty tensors) on small tensors."""
    flat = torch.randn(20_000, device="cuda")
    params = [flat[1:4098], flat[4100:4103], flat[4104:4104], torch.randn(65_537 + 3, device="cuda"),
              torch.randn(1, device="cuda")]
    params = [p.clone() if i == 3 else p for i, p in enumerate(params)]
    params = [p.detach().requires_grad_() for p in params]
    for family, kw in (("Adam", {"amsgrad": True, "weight_decay": 0.1}), ("AdamW", {}), ("Adagrad", {})):
        opt = getattr(optim, family)(params, backend="cuda", **kw)
        for k in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            if k == 1:  # what GradScaler.step hands an optimizer with _step_supports_amp_scaling
                opt.grad_scale, opt.found_inf = torch.tensor(4.0, device="cuda"), torch.tensor(0.0, device="cuda")
            opt.step()
            if k == 1:
                del opt.grad_scale, opt.found_inf
        torch.cuda.synchronize()
        assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.skipif(not _torch_numerics.torch_cuda_fused_adagrad(), reason="this torch has no fused CUDA Adagrad")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", ["plain", "maximize", "amp-overflow"])
@pytest.mark.parametrize("ours", ["cuda", "triton", "transcription"])
def test_adagrad_is_torch_fused_cuda_adagrad_bit_for_bit_on_the_gpu(ours, case, dtype):
    """torch's own ``Adagrad(fused=True)`` on CUDA against the cuda and triton backends and against
    reference.torch_cuda_fused_adagrad: the same bits. This is what confirms the contractions Note
    [CUDA Adagrad order] assumes nvcc made in torch's kernel (the CPU tests check our kernels against
    the transcription only); float64, which torch's kernel takes too, is where the double FMAs show."""
    if ours == "triton" and not available_backends("cuda")["triton"].ok:
        pytest.skip(f"triton backend: {available_backends('cuda')['triton']}")
    data = AdagradBitsCase.make(dtype, sizes=((4099, 1027), (65_537, 3), (130, 1)), steps=12,
                                maximize=case == "maximize", amp=case == "amp-overflow")
    _, expected = data.run(lambda groups, **kw: torch.optim.Adagrad(groups, fused=True, **kw), "cuda")
    if ours == "transcription":
        assert_same_adagrad_bits(data.torch_cuda_fused_adagrad(), expected, data.amp)
    else:
        opt, got = data.run(lambda groups, **kw: optim.Adagrad(groups, backend=ours, **kw), "cuda")
        assert opt.backends_used() == {ours}
        assert_same_adagrad_bits(got, expected, data.amp)
