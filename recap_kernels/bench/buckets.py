"""Kernel-level benchmark: one optimizer over a fixed parameter set, against the memory roofline.

Workloads (fp32, every parameter with a gradient):

* ``single``: one large tensor (1e9 parameters on CUDA, 16M on CPU), where a step is pure bandwidth;
* ``many-small``: 5,000 tensors of 1 to 3,000 elements in 11 param groups with 11 learning rates,
  where per-tensor overhead decides (the recap towers are hundreds of small tensors);
* ``tiny``: 5,000 one-element tensors in 11 groups, where a step is all host cost: its time is
  the ``host`` column of every contender's rows.

Contenders are stock ``torch.optim`` (single-tensor, foreach, fused) and every recap_kernels
kernel backend available on the device; each steps the same parameters from the same starting
values with the same gradients and must end where ``torch.optim`` (single-tensor) ends.

The roofline is measured in the same run: a device-to-device copy (8 B/element, the reference on
CUDA) and the in-place STREAM ``b += s * c`` (12 B/element, the reference on CPU, where a copy's
write-allocate traffic would hide). An fp32 Adam step moves 28 B/parameter, Adagrad 20.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
import time
from typing import Any

import torch
import torch._dynamo

from recap_kernels import optim
from recap_kernels.bench.run import default_backends
from recap_kernels.bench.timing import StepTimer, quantiles

BYTES_PER_PARAM = {"adam": 28, "adagrad": 20}
SINGLE_NUMEL = {"cuda": 1_000_000_000, "cpu": 16 * 2**20}
# Roofline buffers: well past the last-level cache (this CPU's L3 is 260 MiB; an H200's L2 50 MiB).
ROOFLINE_NUMEL = {"cuda": 2**28, "cpu": 2**26}
MANY_SMALL = {"tensors": 5000, "max_numel": 3000, "groups": 11}
TINY = {"tensors": 5000, "groups": 11}


@dataclass(frozen=True)
class BucketWorkload:
    name: str
    sizes: tuple[int, ...]
    groups: int

    @property
    def numel(self) -> int:
        return sum(self.sizes)


def workloads(device: torch.device, scale: float = 1.0) -> list[BucketWorkload]:
    """``single``, ``many-small`` and ``tiny`` for ``device``; ``scale`` shrinks ``single`` (tests, quick runs)."""
    gen = torch.Generator().manual_seed(0)
    many = torch.randint(1, MANY_SMALL["max_numel"] + 1, (MANY_SMALL["tensors"],), generator=gen).tolist()
    return [
        BucketWorkload("single", (max(1, int(SINGLE_NUMEL[device.type] * scale)),), 1),
        BucketWorkload("many-small", tuple(many), MANY_SMALL["groups"]),
        BucketWorkload("tiny", (1,) * TINY["tensors"], TINY["groups"]),
    ]


def contenders(optimizer: str, device: torch.device, backends: list[str] | None = None,
               compiled: bool = False) -> dict[str, Callable]:
    """Name -> optimizer factory taking param groups; the first is the reference.

    ``backends``: the recap_kernels backends to time beside torch's three paths (default: those
    :func:`~recap_kernels.bench.run.default_backends` names). ``compiled`` adds ``recap-<backend>-compiled``
    for each: the same optimizer, its step run through ``torch.compile`` (see :func:`run_workload`).
    """
    stock = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad}[optimizer]
    ours = {"adam": optim.Adam, "adagrad": optim.Adagrad}[optimizer]
    table = {
        "torch-single": partial(stock, foreach=False),
        "torch-foreach": partial(stock, foreach=True),
        "torch-fused": partial(stock, fused=True),
    }
    for name in default_backends(device) if backends is None else backends:
        if name != "torch":  # the torch backend runs torch's own paths, which are already here
            table[f"recap-{name}"] = partial(ours, backend=name)
            if compiled:
                table[f"recap-{name}-compiled"] = table[f"recap-{name}"]
    return table


def workload_tensors(workload: BucketWorkload, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(params, grads)``: the workload's start and its gradients, the same for every contender and run."""
    gen = torch.Generator(device=device).manual_seed(1)
    params = [torch.randn(n, device=device, generator=gen) for n in workload.sizes]
    grads = [torch.randn(n, device=device, generator=gen) for n in workload.sizes]
    return params, grads


def param_groups(params: list[torch.Tensor], count: int) -> list[dict[str, Any]]:
    # Eleven learning rates, as the recap towers have: a multi-tensor kernel must read them per tensor.
    return [{"params": params[i::count], "lr": 1e-3 * (1 + i / count)} for i in range(min(count, len(params)))]


def measure_roofline(device: torch.device, numel: int | None = None, repeats: int = 10) -> dict[str, float]:
    """GB/s of a device-to-device copy and of the in-place STREAM ``b += s * c``, in this run."""
    numel = numel or ROOFLINE_NUMEL[device.type]
    b, c = torch.rand(numel, device=device), torch.rand(numel, device=device)
    copy_timer, stream_timer = StepTimer(device), StepTimer(device)
    for i in range(repeats + 1):
        copy_timer(partial(b.copy_, c), record=i > 0)
        stream_timer(partial(b.add_, c, alpha=1e-3), record=i > 0)
    nbytes = numel * b.element_size()
    return {
        "copy_gbps": 2 * nbytes / (quantiles(copy_timer.samples_ms())[0] * 1e6),
        "stream_gbps": 3 * nbytes / (quantiles(stream_timer.samples_ms())[0] * 1e6),
    }


def roofline_key(device: torch.device) -> str:
    """Which of :func:`measure_roofline`'s figures is the device's roofline: the copy on CUDA, the in-place
    STREAM on CPU (where a copy's write-allocate traffic would hide)."""
    return "copy_gbps" if device.type == "cuda" else "stream_gbps"


@dataclass
class BucketResult:
    workload: str
    optimizer: str
    contender: str
    samples_ms: list[float]
    numel: int
    tensors: int
    check: str
    compile_s: float | None = None  # a compiled contender's first step, compilation included


def check_against(params: list[torch.Tensor], reference: list[torch.Tensor]) -> str:
    """``"OK"`` when every parameter matches the reference's (``assert_close`` defaults), else ``"MISMATCH"``."""
    for p, ref in zip(params, reference):
        try:
            torch.testing.assert_close(p, ref)
        except AssertionError:
            return "MISMATCH"
    return "OK"


def compile_step(opt: torch.optim.Optimizer, device: torch.device) -> tuple[Callable[[], object], float]:
    """``torch.compile(opt.step)`` (Inductor, one graph) and the seconds its first call took: the
    compilation, from a reset Dynamo, the step's device work included."""
    torch._dynamo.reset()
    step = torch.compile(opt.step, fullgraph=True)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return step, time.perf_counter() - start


def run_workload(workload: BucketWorkload, optimizer: str, device: torch.device, *, steps: int,
                 warmup: int, backends: list[str] | None = None, compiled: bool = False,
                 tick: Callable[[], object] | None = None) -> list[BucketResult]:
    """Every contender from the same start on the same gradients; the reference's final values judge the rest.

    A ``-compiled`` contender steps through ``torch.compile(opt.step)`` (Inductor); its first step, which
    compiles, is timed apart (``compile_s``) and counted in neither the warm-up nor the samples.

    Contenders run one after another on one set of buffers (the parameters are reset from a saved
    copy), so a 1e9-parameter bucket needs room for one optimizer's state at a time.
    """
    params, grads = workload_tensors(workload, device)
    initial = [p.clone() for p in params]
    reference_final: list[torch.Tensor] | None = None
    results = []
    for name, make in contenders(optimizer, device, backends, compiled).items():
        for p, p0, g in zip(params, initial, grads):
            p.copy_(p0)
            p.grad = g
        opt = make(param_groups(params, workload.groups))
        timer = StepTimer(device)
        step, compile_s, skip = opt.step, None, warmup
        if name.endswith("-compiled"):
            step, compile_s = compile_step(opt, device)
            skip = max(warmup - 1, 0)  # the compiling step was one of the warm-up steps
        for i in range(skip + steps):
            timer(step, record=i >= skip)
        if reference_final is None:
            reference_final, check = [p.clone() for p in params], "OK (reference)"
        else:
            check = check_against(params, reference_final)
        results.append(BucketResult(workload.name, optimizer, name, timer.samples_ms(), workload.numel,
                                    len(workload.sizes), check, compile_s))
        del opt  # free its state before the next contender allocates its own
        if tick is not None:
            tick()
    return results


def rows(results: list[BucketResult], roofline: dict[str, float], device: torch.device,
         environment: dict[str, Any]) -> list[dict[str, Any]]:
    """Long-format rows, the same fields as the recap workload's where they apply."""
    reference_key = roofline_key(device)
    fused = {(r.workload, r.optimizer): quantiles(r.samples_ms)[0] for r in results if r.contender == "torch-fused"}
    host = {(r.optimizer, r.contender): quantiles(r.samples_ms)[0] for r in results if r.workload == "tiny"}
    out = []
    for r in results:
        p50, p20, p80 = quantiles(r.samples_ms)
        gbps = BYTES_PER_PARAM[r.optimizer] * r.numel / (p50 * 1e6)
        out.append({
            "suite": "kernels", "workload": r.workload, "optimizer": r.optimizer, "contender": r.contender,
            "dtype": "float32", "bytes": BYTES_PER_PARAM[r.optimizer] * r.numel,
            "n_params": r.numel, "n_tensors": r.tensors, "p50": p50, "p20": p20, "p80": p80, "unit": "ms",
            "bytes_per_param": BYTES_PER_PARAM[r.optimizer], "gbps": gbps,
            "roofline": reference_key.removesuffix("_gbps"), "roofline_gbps": roofline[reference_key],
            "frac_of_roofline": gbps / roofline[reference_key],
            "speedup_vs_torch_fused": fused.get((r.workload, r.optimizer), float("nan")) / p50,
            "host_ms": host.get((r.optimizer, r.contender), float("nan")),
            "check": r.check, "compile_s": r.compile_s, **roofline, **environment,
        })
    return out


def format_rows(table_rows: list[dict[str, Any]], roofline: dict[str, float], device: torch.device) -> str:
    reference = "copy" if device.type == "cuda" else "in-place STREAM"
    lines = [
        "",
        f"kernels: one optimizer over a fixed fp32 parameter set; roofline measured in this run: "
        f"copy {roofline['copy_gbps']:.1f} GB/s, in-place STREAM {roofline['stream_gbps']:.1f} GB/s "
        f"(% bw is of the {reference})",
    ]
    header = ("workload", "optimizer", "contender", "p50 ms", "GB/s", "% bw", "x torch-fused", "host ms", "check")
    table = [header] + [
        (r["workload"], r["optimizer"], r["contender"], f"{r['p50']:.3f}", f"{r['gbps']:.1f}",
         f"{100 * r['frac_of_roofline']:.0f}", f"{r['speedup_vs_torch_fused']:.2f}", f"{r['host_ms']:.3f}",
         r["check"] + (f" (compiled in {r['compile_s']:.1f} s)" if r.get("compile_s") is not None else ""))
        for r in table_rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [c.ljust(w) if i in (0, 1, 2, 8) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.append("(GB/s at 28 B/param for Adam, 20 for Adagrad; x torch-fused: speed relative to torch's fused path; "
                 "host ms: the same contender's step on the tiny workload, 5,000 one-element tensors, where a step "
                 "is all host cost)")
    return "\n".join(lines)
