"""The triton backend's multi-tensor machinery (its numbers are checked by the shared harness).

On a machine without a GPU these run through Triton's interpreter (see conftest.py).
"""

import pytest
import torch
import triton
import triton.language as tl

from recap_kernels import BackendUnavailableError, available_backends, optim
from recap_kernels._triton import _math, multi_tensor
from tests import ptx
from tests.reference import (
    AdagradBitsCase,
    assert_optimizer_close,
    assert_same_adagrad_bits,
    make_grads,
    make_params,
    roundtrip_state_dict,
    torch_cuda_fused_adagrad,
    torch_cuda_opmath_adam,
    train,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available_backends(DEVICE)["triton"][0],
                                reason=f"triton backend unavailable: {available_backends(DEVICE)['triton'][1]}")


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches per optimizer family."""
    from recap_kernels._triton import adagrad, adam

    counts = {"adam": 0, "adagrad": 0}
    for module, name in ((adam, "adam"), (adagrad, "adagrad")):
        real = getattr(module, f"{name}_launch")

        def counting(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, f"{name}_launch", counting)
    return counts


def _pair(shapes, dtype=torch.float32, seed=0):
    init = make_params(shapes, dtype, DEVICE, seed=seed)
    return [p.clone().requires_grad_() for p in init], [p.clone().requires_grad_() for p in init]


def _eleven_groups(params, lrs):
    return [{"params": params[i::11], "lr": lr} for i, lr in enumerate(lrs)]


def test_300_tensors_in_11_groups_step_in_one_launch(launches):
    gen = torch.Generator().manual_seed(7)
    # Sizes 1 ... 70,000, log-uniform (like a model's mix of biases and weights), kept small enough
    # for the interpreter.
    sizes = torch.exp(torch.rand(300, generator=gen) * torch.log(torch.tensor(70_000.0))).long().tolist()
    sizes[0], sizes[1] = 1, 70_000
    ref_params, params = _pair([(n,) for n in sizes])
    lrs = [1e-3 * (i + 1) for i in range(11)]
    ref = torch.optim.Adam(_eleven_groups(ref_params, lrs), weight_decay=0.01)
    opt = optim.Adam(_eleven_groups(params, lrs), weight_decay=0.01, backend="triton")
    grads = make_grads(ref_params, 3)
    train(ref, ref_params, grads)
    train(opt, params, grads)
    assert launches["adam"] == 3  # one per step for all 300 tensors and 11 learning rates
    assert_optimizer_close(ref, ref_params, opt, params, torch.float32)


def _tables(opt):
    """The device tables of the optimizer's cached plans."""
    return {id(run.table) for plan in opt._plans.values() for _, bucket in plan.entries for run in bucket.runs}


def test_scheduler_lr_changes_reach_the_kernel_without_rebuilding_tables():
    ref_params, params = _pair([(5,), (4097,), (3,)])
    ref = torch.optim.AdamW([{"params": ref_params[:2]}, {"params": ref_params[2:]}])
    opt = optim.AdamW([{"params": params[:2]}, {"params": params[2:]}], backend="triton")
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, [lambda s: 0.5**s, lambda s: 1 + s]) for o in (ref, opt)]
    gen = torch.Generator().manual_seed(5)
    tables = set()
    for _ in range(6):
        step_grads = [torch.randn(p.shape, generator=gen).to(DEVICE) for p in params]
        for o, ps, sched in ((ref, ref_params, schedules[0]), (opt, params, schedules[1])):
            train(o, ps, [step_grads])
            sched.step()
        tables |= _tables(opt)
    assert len(tables) == 1
    assert_optimizer_close(ref, ref_params, opt, params, torch.float32)


def test_a_gradient_missing_every_other_step_reuses_cached_tables():
    ref_params, params = _pair([(5,), (300,), (3,)])
    ref, opt = torch.optim.Adam(ref_params), optim.Adam(params, backend="triton")
    gen = torch.Generator().manual_seed(6)
    tables = set()
    for step in range(6):
        step_grads = [None if i == 1 and step % 2 else torch.randn(p.shape, generator=gen).to(DEVICE)
                      for i, p in enumerate(params)]
        train(ref, ref_params, [step_grads])
        train(opt, params, [step_grads])
        tables |= _tables(opt)
    assert len(tables) == 2
    assert_optimizer_close(ref, ref_params, opt, params, torch.float32)


def test_param_group_added_after_the_first_step():
    ref_params, params = _pair([(7,), (130,), (33, 5), (2,)])
    ref = torch.optim.Adam(ref_params[:2], lr=0.01)
    opt = optim.Adam(params[:2], lr=0.01, backend="triton")
    grads = make_grads(ref_params, 6)
    train(ref, ref_params, grads[:3])
    train(opt, params, grads[:3])
    ref.add_param_group({"params": ref_params[2:], "lr": 0.05, "betas": (0.5, 0.9)})
    opt.add_param_group({"params": params[2:], "lr": 0.05, "betas": (0.5, 0.9)})
    train(ref, ref_params, grads[3:])
    train(opt, params, grads[3:])
    assert_optimizer_close(ref, ref_params, opt, params, torch.float32)


def test_mixed_dtypes_in_one_group_are_two_buckets(launches):
    init = make_params([(9,), (100,)], torch.float32, DEVICE) + make_params([(17,), (4097,)], torch.bfloat16, DEVICE)
    ref_params = [p.clone().requires_grad_() for p in init]
    params = [p.clone().requires_grad_() for p in init]
    ref = torch.optim.Adagrad(ref_params, lr_decay=0.01, fused=True)
    opt = optim.Adagrad(params, lr_decay=0.01, backend="triton")
    grads = make_grads(ref_params, 4)
    train(ref, ref_params, grads)
    train(opt, params, grads)
    assert launches["adagrad"] == 8  # two buckets, four steps
    assert len(opt._plan_cache.entries) == 2
    assert_optimizer_close(ref, ref_params[:2], opt, params[:2], torch.float32)
    assert_optimizer_close(ref, ref_params[2:], opt, params[2:], torch.bfloat16)


def test_tables_follow_replaced_state(launches):
    """Loading a state_dict swaps the state tensors: the cached addresses must not be reused."""
    ref_params, params = _pair([(50,), (3,)])
    ref = torch.optim.Adam(ref_params, amsgrad=True)
    opt = optim.Adam(params, amsgrad=True, backend="triton")
    grads = make_grads(ref_params, 6)
    train(ref, ref_params, grads[:3])
    train(opt, params, grads[:3])
    opt.load_state_dict(roundtrip_state_dict(ref, DEVICE))  # same numbers, new tensors
    train(ref, ref_params, grads[3:])
    train(opt, params, grads[3:])
    assert_optimizer_close(ref, ref_params, opt, params, torch.float32)


def test_multi_chunk_tensors(monkeypatch):
    """Tensors spanning many programs, with tails, and a chunk a multiple of the block."""
    small = multi_tensor.LaunchConfig(block_size=64, chunk_size=256, num_warps=1)
    monkeypatch.setattr(multi_tensor, "launch_config", lambda device: small)
    ref_params, params = _pair([(1000,), (256,), (257,), (1,)])
    ref = torch.optim.Adam(ref_params, weight_decay=0.1, amsgrad=True)
    opt = optim.Adam(params, weight_decay=0.1, amsgrad=True, backend="triton")
    grads = make_grads(ref_params, 4)
    train(ref, ref_params, grads)
    train(opt, params, grads)
    assert_optimizer_close(ref, ref_params, opt, params, torch.float32)


def test_backends_used_names_triton_only_when_it_ran():
    dense = torch.randn(8, 4, device=DEVICE).requires_grad_()
    strided = torch.randn(4, 8, device=DEVICE).t().requires_grad_()  # non-contiguous: torch's job
    opt = optim.Adam([dense, strided], backend="auto" if DEVICE == "cuda" else "triton")
    dense.grad = torch.randn_like(dense)
    if DEVICE == "cpu":
        # CPU's auto order is cpu > torch; an explicit triton refuses what it cannot take.
        strided.grad = torch.randn_like(strided)
        with pytest.raises(BackendUnavailableError, match="contiguous dense tensors, not strided"):
            opt.step()
        strided.grad = None
    opt.step()
    assert opt.backends_used() == {"triton"}


def test_auto_routes_what_triton_cannot_take_to_torch(monkeypatch):
    monkeypatch.setenv("RECAP_KERNELS_BACKEND", "triton")
    dense = torch.randn(8, 4, device=DEVICE).requires_grad_()
    opt = optim.Adam([dense])
    dense.grad = torch.randn_like(dense)
    opt.step()
    assert opt.backends_used() == {"triton"}
    table = torch.randn(10, 3, device=DEVICE).requires_grad_()
    table.grad = torch.randn(10, 3, device=DEVICE).to_sparse()  # sparse_dim 2: not whole rows
    sparse_opt = optim.Adagrad([table])
    with pytest.raises(BackendUnavailableError, match="take contiguous dense tensors, not other-sparse ones"):
        sparse_opt.step()


def test_amp_scaler_like_call_unscales_in_kernel_and_skips_on_overflow():
    ref_params, params = _pair([(33,), (4,)])
    ref = torch.optim.Adam(ref_params, fused=True)
    opt = optim.Adam(params, backend="triton")
    grads = make_grads(ref_params, 3)
    scale = torch.tensor(1024.0, device=DEVICE)
    for step, step_grads in enumerate(grads):
        found_inf = torch.tensor(1.0 if step == 1 else 0.0, device=DEVICE)
        for o, ps in ((ref, ref_params), (opt, params)):
            for p, g in zip(ps, step_grads):
                p.grad = None if g is None else g * scale
            o.grad_scale, o.found_inf = scale, found_inf  # what GradScaler.step sets
            o.step()
            del o.grad_scale, o.found_inf
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p.grad, r.grad)  # unscaled in place (unless skipped), as torch's fused path
    assert_optimizer_close(ref, ref_params, opt, params, torch.float32)
    assert opt.state[params[0]]["step"].item() == 2  # the overflow step was not counted


@pytest.mark.gpu
def test_cuda_graph_capture_replays_like_eager_steps():
    init = make_params([(1000,), (4097,), (3,)], torch.float32, "cuda")
    eager_params = [p.clone().requires_grad_() for p in init]
    graph_params = [p.clone().requires_grad_() for p in init]
    lr = torch.tensor(1e-3, device="cuda")
    eager = optim.Adam(eager_params, lr=lr.clone(), capturable=True, backend="triton")
    captured = optim.Adam(graph_params, lr=lr, capturable=True, backend="triton")
    grads = make_grads(init, 8)
    static_grads = [torch.zeros_like(p) for p in graph_params]
    for p, g in zip(graph_params, static_grads):
        p.grad = g
    # Warm up on a side stream (tables built, kernels compiled), then capture one step.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for g, s in zip(grads[0], static_grads):
            s.copy_(g)
        captured.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.step()
    train(eager, eager_params, grads[:1])
    for step_grads in grads[1:]:
        for g, s in zip(step_grads, static_grads):
            s.copy_(g)
        graph.replay()
        train(eager, eager_params, [step_grads])
    torch.cuda.synchronize()
    assert_optimizer_close(eager, eager_params, captured, graph_params, torch.float32)


# The opmath order rounds beta2 to fp32 before it forms 1 - beta2: 1 - float(0.999) is 1.3e-5
# (relative) off 1 - 0.999, and exp_avg_sq follows. torch's own fused CUDA Adam (torch >= 2.11) is
# that far from torch.optim's default path in fp32; the rest of its arithmetic is checked bit for
# bit by test_cuda_opmath_order_is_torch_adam_math_bit_for_bit.
OPMATH_FP32_TOLERANCES = {"rtol": 2e-5, "atol": 1e-5}


@pytest.mark.parametrize("order", [_math.CUDA_DOUBLE_ORDER.value, _math.CUDA_OPMATH_ORDER.value],
                         ids=["cuda-double", "cuda-opmath"])
@pytest.mark.parametrize("options", ["adam-amsgrad-wd", "adamw-amsgrad-maximize", "adam-lr-tensor"])
def test_cuda_operation_orders_are_accurate_in_fp32(monkeypatch, options, order):
    """Both orders of torch's CUDA Adam, run on this machine: fp32 results within the harness tolerance."""
    from tests import reference

    monkeypatch.setattr(multi_tensor, "torch_cuda_order", lambda device: order)
    if order == _math.CUDA_OPMATH_ORDER.value:
        monkeypatch.setattr(reference, "tolerances", lambda dtype: OPMATH_FP32_TOLERANCES)
    reference.check_equivalence("triton", next(o for o in reference.OPTION_MATRIX if o.id == options), torch.float32,
                                device=DEVICE)


def test_torch_cuda_order_follows_the_installed_torch():
    from recap_kernels._torch_numerics import torch_cuda_adam_opmath

    cuda_order = _math.CUDA_OPMATH_ORDER if torch_cuda_adam_opmath() else _math.CUDA_DOUBLE_ORDER
    assert multi_tensor.torch_cuda_order(torch.device("cuda")) == cuda_order.value
    assert multi_tensor.torch_cuda_order(torch.device("cpu")) == _math.CPU_ORDER.value


def test_torch_cuda_adagrad_order_follows_the_installed_torch():
    """On CUDA, torch's fused CUDA Adagrad's order (the CUDA double order) where torch has one; else, and
    off CUDA, torch's fused CPU Adagrad's."""
    from recap_kernels._torch_numerics import torch_cuda_fused_adagrad

    cuda_order = _math.CUDA_DOUBLE_ORDER if torch_cuda_fused_adagrad() else _math.CPU_ORDER
    assert multi_tensor.torch_cuda_adagrad_order(torch.device("cuda")) == cuda_order.value
    assert multi_tensor.torch_cuda_adagrad_order(torch.device("cpu")) == _math.CPU_ORDER.value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("case", ["plain", "maximize", "amp-overflow"])
def test_cuda_adagrad_order_is_torch_fused_cuda_adagrad_bit_for_bit(monkeypatch, case, dtype):
    """The Adagrad kernel in the CUDA order against a transcription of torch's fused CUDA kernel
    (reference.torch_cuda_fused_adagrad): the same bits in every parameter, sum, step counter and
    unscaled gradient, over three groups (float and Tensor lr, lr_decay, weight decay, eps, initial
    accumulator). float64 pins down the fp64 FMAs (Note [CUDA Adagrad order] in adagrad_math.h)."""
    monkeypatch.setattr(multi_tensor, "torch_cuda_adagrad_order", lambda device: _math.CUDA_DOUBLE_ORDER.value)
    data = AdagradBitsCase.make(dtype, sizes=((1031, 259), (3, 2), (130, 1)), steps=8,
                                maximize=case == "maximize", amp=case == "amp-overflow")
    opt, got = data.run(lambda groups, **kw: optim.Adagrad(groups, backend="triton", **kw), DEVICE)
    assert opt.backends_used() == {"triton"}
    assert_same_adagrad_bits(got, data.torch_cuda_fused_adagrad(), data.amp)


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter's numpy, on inf/NaN
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_cuda_adagrad_order_edge_values_are_torch_fused_cuda_adagrads(monkeypatch, weight_decay, dtype):
    """inf, NaN, huge, tiny and zero gradients and parameters in the CUDA order: the transcription's
    values, NaN for NaN, after three steps (a weight decay of 0 skips the term, as torch does)."""
    monkeypatch.setattr(multi_tensor, "torch_cuda_adagrad_order", lambda device: _math.CUDA_DOUBLE_ORDER.value)
    big, tiny = torch.finfo(dtype).max, torch.finfo(dtype).tiny
    specials = [float("inf"), -float("inf"), float("nan"), big, -big, tiny, -tiny, 0.0, 1.0, -3.0]
    grid = torch.tensor([(p, g) for p in specials for g in specials], dtype=torch.float64).to(dtype)
    init, grad = grid[:, 0].contiguous(), grid[:, 1].contiguous()
    param = init.to(DEVICE, copy=True).requires_grad_()
    opt = optim.Adagrad([param], lr=0.5, lr_decay=0.1, weight_decay=weight_decay, eps=1e-10, backend="triton")
    for _ in range(3):
        param.grad = grad.to(DEVICE, copy=True)
        opt.step()
    want_param, want_sum, _, _ = torch_cuda_fused_adagrad(init, [grad] * 3, dtype=dtype, lr=0.5, lr_decay=0.1,
                                                          weight_decay=weight_decay, eps=1e-10)
    for name, got, want in (("param", param.detach().cpu(), want_param), ("sum", opt.state[param]["sum"].cpu(),
                                                                          want_sum)):
        nan = got.isnan()
        assert torch.equal(nan, want.isnan()) and torch.equal(got[~nan], want[~nan]), name


@triton.jit
def _fma_kernel(a_ptr, b_ptr, c_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    a, b, c = tl.load(a_ptr + offs, mask=mask), tl.load(b_ptr + offs, mask=mask), tl.load(c_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, _math._fma(a, b, c), mask=mask)


def test_fma_rounds_once():
    """``_math._fma`` is ``fma.rn``: on the GPU by definition, in the interpreter by its fp64 emulation."""
    from fractions import Fraction

    from tests.reference import fma_operands

    a, b, c, exact = fma_operands(512)
    gen = torch.Generator().manual_seed(6)
    out = torch.empty_like(a, device=DEVICE)
    _fma_kernel[(1,)](a.to(DEVICE), b.to(DEVICE), c.to(DEVICE), out, 512, BLOCK=512)
    assert out.cpu().tolist() == exact
    # fp32: (1 + 2^-12)^2 + 2^-80 lies just above halfway between two floats: it rounds up, where
    # the sum rounded to fp64 first would then round to even, down. And a plain random batch.
    a32 = torch.cat([torch.tensor([1 + 2.0**-12]), torch.randn(511, generator=gen)])
    c32 = torch.cat([torch.tensor([2.0**-80]), torch.randn(511, generator=gen)])
    out32 = torch.empty_like(a32, device=DEVICE)
    _fma_kernel[(1,)](a32.to(DEVICE), a32.to(DEVICE), c32.to(DEVICE), out32, 512, BLOCK=512)
    assert out32[0].item() == 1 + 2.0**-11 + 2.0**-23
    exact32 = torch.tensor([float(Fraction(x) * Fraction(x) + Fraction(z)) for x, z in zip(a32.tolist(), c32.tolist())],
                           dtype=torch.float64)
    # For the others, the exact value rounded to fp64 and then to fp32 (which errs only near halfway
    # cases such as the first) is the fp32 FMA.
    assert torch.equal(out32.cpu()[1:], exact32[1:].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["adam-amsgrad-wd", "adamw-amsgrad-maximize", "adam-lr-tensor-amp"])
def test_cuda_opmath_order_is_torch_adam_math_bit_for_bit(monkeypatch, case, dtype):
    """The opmath order against a transcription of torch's kernel: the same bits, every state."""
    kwargs = {
        "adam-amsgrad-wd": {"lr": 3e-3, "betas": (0.9, 0.999), "weight_decay": 0.05, "amsgrad": True},
        "adamw-amsgrad-maximize": {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.1, "amsgrad": True,
                                   "maximize": True},
        "adam-lr-tensor-amp": {"lr": torch.tensor(2e-3), "betas": (0.9, 0.999), "eps": 1e-6},
    }[case]
    decoupled, amp = case.startswith("adamw"), case.endswith("amp")
    monkeypatch.setattr(multi_tensor, "torch_cuda_order", lambda device: _math.CUDA_OPMATH_ORDER.value)
    (init,) = make_params([(4099,)], torch.float32, "cpu", seed=3)
    grads = [step[0] for step in make_grads([init, init], 6)]  # the last parameter gets none
    scale = torch.tensor(1024.0)
    param = init.to(DEVICE, dtype, copy=True).requires_grad_()
    opt = (optim.AdamW if decoupled else optim.Adam)(
        [param], backend="triton", **{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in kwargs.items()})
    for g in grads:
        param.grad = (g * scale if amp else g).to(dtype).to(DEVICE)
        if amp:
            opt.grad_scale, opt.found_inf = scale.to(DEVICE), torch.tensor(0.0, device=DEVICE)
        opt.step()
    defaults = {"eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, "maximize": False}
    expected = torch_cuda_opmath_adam(init, [g * scale if amp else g for g in grads], dtype=dtype,
                                       decoupled=decoupled, grad_scale=scale if amp else None, **{**defaults, **kwargs})
    state = opt.state[param]
    actual = (param.detach(), state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"))
    for name, got, want in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), actual, expected):
        if got is not None:
            assert torch.equal(got.cpu(), want), f"{name}: {(got.cpu().float() - want.float()).abs().max()}"


@pytest.mark.parametrize("family", ["adam", "adagrad"])
def test_compiled_step_has_no_graph_breaks_and_no_recompiles_when_lr_changes(family):
    """Under torch.compile the step is one opaque op (Note [Compiled steps]); a changing lr keeps it compiled."""
    import torch._dynamo

    ref_params, params = _pair([(5,), (300,), (7, 3)])
    ref_cls, cls = (torch.optim.Adam, optim.Adam) if family == "adam" else (torch.optim.Adagrad, optim.Adagrad)
    kwargs = {"weight_decay": 0.01, **({"amsgrad": True} if family == "adam" else {"lr_decay": 0.01})}
    ref = ref_cls(ref_params, lr=torch.tensor(0.01), **kwargs)
    opt = cls(params, lr=torch.tensor(0.01, device=DEVICE), backend="triton", **kwargs)
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(p.shape, generator=gen).to(DEVICE) for p in params] for _ in range(5)]
    for ps in (ref_params, params):
        for p, g in zip(ps, grads[0]):
            p.grad = g
    ref.step()
    opt.step()  # eager first step: creating the state would otherwise recompile once
    compiled_step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, step_grads in enumerate(grads[1:]):
            for ps in (ref_params, params):
                for p, g in zip(ps, step_grads):
                    p.grad = g
            ref.step()
            compiled_step()
            for o in (ref, opt):
                o.param_groups[0]["lr"].fill_(0.01 / (i + 2))  # what a scheduler does to a Tensor lr
    assert_optimizer_close(ref, ref_params, opt, params, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["adam-wd-amsgrad", "adamw", "adam-lerp-from-grad", "adagrad-wd-maximize-amp"])
def test_cpu_order_is_torch_fused_cpu_bit_for_bit(case, dtype):
    """The CPU order (the FMAs of adam_math.h / adagrad_math.h) gives torch's fused CPU bits.

    Adam runs in that order on the CPU only; Adagrad on the CPU, and on CUDA with a torch that has no
    fused CUDA Adagrad (torch < 2.12), against torch's CPU kernel.
    ``betas=(0.4, ...)`` takes torch's lerp branch for weights >= 0.5.
    """
    family, kwargs = {
        "adam-wd-amsgrad": ("adam", {"lr": 3e-3, "weight_decay": 0.05, "amsgrad": True}),
        "adamw": ("adamw", {"lr": 1e-2, "weight_decay": 0.1, "maximize": True}),
        "adam-lerp-from-grad": ("adam", {"lr": 1e-2, "betas": (0.4, 0.95), "weight_decay": 0.02}),
        "adagrad-wd-maximize-amp": ("adagrad", {"lr": 0.05, "lr_decay": 0.01, "weight_decay": 0.1,
                                                "maximize": True}),
    }[case]
    if family != "adagrad" and DEVICE == "cuda":
        pytest.skip("on CUDA, Adam follows torch's CUDA order")
    if DEVICE == "cuda" and multi_tensor.torch_cuda_adagrad_order(torch.device(DEVICE)) != _math.CPU_ORDER.value:
        pytest.skip("on CUDA, Adagrad follows torch's fused CUDA Adagrad (torch >= 2.12)")
    ref_cls, cls = (torch.optim.Adam, optim.Adam) if family == "adam" else (
        (torch.optim.AdamW, optim.AdamW) if family == "adamw" else (torch.optim.Adagrad, optim.Adagrad))
    init = make_params([(4099,), (3,)], dtype, "cpu", seed=4)
    ref_params = [p.clone().requires_grad_() for p in init]
    params = [p.to(DEVICE, copy=True).requires_grad_() for p in init]
    ref, opt = ref_cls(ref_params, fused=True, **kwargs), cls(params, backend="triton", **kwargs)
    amp = case.endswith("amp")
    scale = torch.tensor(256.0)
    for step_grads in make_grads(init + [init[0]], 8):
        for o, ps, device in ((ref, ref_params, "cpu"), (opt, params, DEVICE)):
            for p, g in zip(ps, step_grads):
                p.grad = None if g is None else (g * scale if amp else g).to(device)
            if amp:
                o.grad_scale, o.found_inf = scale.to(device), torch.tensor(0.0, device=device)
            o.step()
    for r, p in zip(ref_params, params):
        assert torch.equal(p.detach().cpu(), r.detach())
        for key, value in ref.state[r].items():
            if key != "step":
                assert torch.equal(opt.state[p][key].cpu(), value), key


# Compiled for sm_90 in a process without the interpreter (no GPU needed). One and two elements per
# thread: the difference is one element's update, apart from the per-tensor scalars (whose fp64
# pow comes from libdevice, FMAs included).
_PTX_SCRIPT = r"""
import json
import triton.language as tl
from recap_kernels._triton.adagrad import _adagrad_kernel
from recap_kernels._triton.adam import _adam_kernel
from tests.ptx import op_counts

SIG = {"ptrs": "*i64", "numel_ptr": "*i64", "tensor_group_ptr": "*i32", "chunk_tensor_ptr": "*i32",
       "chunk_start_ptr": "*i64", "hyper_ptr": "*fp64", "lr_addr_ptr": "*i64", "grad_scale_ptr": "*fp32",
       "found_inf_ptr": "*fp32", "num_tensors": "i32", "num_groups": "i32"}
OPS = ("fma.rn.f32", "fma.rn.f64", "div.rn.f32", "sqrt.rn.f32", "div.full", "div.approx", "sqrt.approx",
       "mul.f32", "add.f32", "sub.f32")

def counts(kernel, constexprs, block):
    constexprs = {**constexprs, "CHUNK_SIZE": block, "BLOCK_SIZE": block, "HAS_GRAD_SCALE": True,
                  "HAS_FOUND_INF": True, "DTYPE": tl.bfloat16, "MATH_DTYPE": tl.float32, "MAXIMIZE": False}
    return op_counts(kernel, SIG, constexprs, OPS, num_warps=4)

out = {}
for name, kernel, constexprs in [
    ("adam-0", _adam_kernel, {"ORDER": 0, "AMSGRAD": True, "DECOUPLED": False}),
    ("adamw-0", _adam_kernel, {"ORDER": 0, "AMSGRAD": True, "DECOUPLED": True}),
    ("adam-1", _adam_kernel, {"ORDER": 1, "AMSGRAD": True, "DECOUPLED": False}),
    ("adamw-1", _adam_kernel, {"ORDER": 1, "AMSGRAD": True, "DECOUPLED": True}),
    ("adam-2", _adam_kernel, {"ORDER": 2, "AMSGRAD": True, "DECOUPLED": False}),
    ("adamw-2", _adam_kernel, {"ORDER": 2, "AMSGRAD": True, "DECOUPLED": True}),
    ("adagrad", _adagrad_kernel, {"ORDER": 0}),
]:
    one, two = counts(kernel, constexprs, 128), counts(kernel, constexprs, 256)
    out[name] = {"per_element": {op: two[op] - one[op] for op in OPS}, "kernel": one}
print(json.dumps(out))
"""


def test_sm90_ptx_has_ieee_division_and_square_root_and_only_the_orders_fmas():
    """What the GPU runs: correctly rounded fp32 ``/`` and sqrt, and exactly the FMAs each order spells out.

    Per element, bf16 storage, AMP, weight decay: the orders' FMAs (Note [Operation orders]) are
    CPU: L2 decay, lerp, second moment; CUDA double: decay, both moments (fp64); CUDA opmath:
    decay and two per moment; Adagrad: L2 decay and ``sum + g * g``. No plain fp32 ``mul``/``add``
    either: Triton launched with ``enable_fp_fusion=False`` emits the ``.rn`` forms, which ptxas
    does not contract.
    """
    found = ptx.run(_PTX_SCRIPT)
    fmas = {"adam-0": (3, 0), "adamw-0": (2, 0), "adam-1": (0, 3), "adamw-1": (0, 3), "adam-2": (5, 0),
            "adamw-2": (5, 0), "adagrad": (2, 0)}
    # unscale, sqrt(v) / bias_correction2_sqrt, (step_size * m) / denom; CUDA double unscales in fp64.
    divisions = {"adam-1": 2, "adamw-1": 2, "adagrad": 2}
    for name, counts in found.items():
        per_element, kernel = counts["per_element"], counts["kernel"]
        assert (per_element["fma.rn.f32"], per_element["fma.rn.f64"]) == fmas[name], (name, per_element)
        assert per_element["div.rn.f32"] == divisions.get(name, 3), (name, per_element)
        assert per_element["sqrt.rn.f32"] == 1, (name, per_element)
        for op in ("div.full", "div.approx", "sqrt.approx", "mul.f32", "add.f32", "sub.f32"):
            assert kernel[op] == 0, (name, op, kernel)


def test_sm90_ptx_of_the_cuda_adagrad_order_is_torch_adagrad_math():
    """The Adagrad kernel in the CUDA double order (torch's fused CUDA Adagrad), bf16 storage, AMP, weight
    decay, per element: the fp64 FMA of the weight decay and the fp32 one of ``sum + g * g``; an IEEE
    fp32 unscale and square root; the update ``p - clr * g / (sqrt + eps)`` as one IEEE fp64 multiply,
    add, division and subtraction; and nothing Triton or ptxas may contract (no plain ``mul``/``add``).
    Per kernel, one more fp64 FMA: ``1 + (step - 1) * lr_decay``.
    """
    script = _PTX_SCRIPT.split("out = {}")[0] + r"""
OPS = OPS + ("div.rn.f64", "mul.rn.f64", "add.rn.f64", "sub.rn.f64", "mul.f64", "add.f64", "sub.f64")
one, two = counts(_adagrad_kernel, {"ORDER": 1}, 128), counts(_adagrad_kernel, {"ORDER": 1}, 256)
print(json.dumps({"per_element": {op: two[op] - one[op] for op in OPS}, "kernel": one}))
"""
    found = ptx.run(script)
    per_element, kernel = found["per_element"], found["kernel"]
    expected = {"fma.rn.f32": 1, "fma.rn.f64": 1, "div.rn.f32": 1, "sqrt.rn.f32": 1, "div.rn.f64": 1,
                "mul.rn.f64": 1, "add.rn.f64": 1, "sub.rn.f64": 1}
    assert {op: n for op, n in per_element.items() if n} == expected, per_element
    assert kernel["fma.rn.f64"] == 2, kernel
    for op in ("div.full", "div.approx", "sqrt.approx", "mul.f32", "add.f32", "sub.f32", "mul.f64", "add.f64",
               "sub.f64"):
        assert kernel[op] == 0, (op, kernel)
