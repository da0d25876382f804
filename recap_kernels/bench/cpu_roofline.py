"""The ``cpu`` backend against torch's CPU paths and the in-place STREAM bandwidth, per thread count.

``run_cpu_suite(threads)`` runs, for each thread count, in one process and one run:

* the in-place STREAM ``b += s * c`` (12 B/element; :func:`buckets.measure_roofline`), before and
  after the workloads: the higher of the two is the roofline of that thread count;
* the kernel workloads of :mod:`recap_kernels.bench.buckets` (``single``: one 16M-parameter
  tensor; ``many-small``: 5,000 tensors of 1 to 3,000 elements in 11 groups with 11 learning
  rates), for Adam and Adagrad, with the contenders torch single-tensor, foreach and fused, and
  ``recap-cpu`` (``optim.Adam(backend="cpu")``: the whole optimizer step);
* ``recap-cpu-op``: the ``recap_kernels::fused_*_`` op alone on lists built once, which is the
  kernel plus the op call, without the optimizer's Python step (plan, buckets).

Every contender starts from the same values and gradients and must end where torch's
single-tensor path ends (``check``). Rows are the long-format rows of ``buckets.rows`` plus
``threads`` and ``stream_gbps``; ratios only mean something within one run (one machine, one load).

    python -m recap_kernels.bench.cpu_roofline            # 1 thread and all cores
    python -m recap_kernels.bench.cpu_roofline 2 --steps 20
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from recap_kernels.bench import buckets
from recap_kernels.bench.run import environment
from recap_kernels.bench.timing import StepTimer

DEVICE = torch.device("cpu")
OPTIMIZERS = ("adam", "adagrad")
DEFAULTS = {"betas": (0.9, 0.999), "adam_eps": 1e-8, "adagrad_eps": 1e-10}


def _op_step(optimizer: str, workload: buckets.BucketWorkload, params, grads):
    """The fused op over every tensor, the lists built once: what ``recap-cpu`` costs minus Python."""
    from recap_kernels import _ops

    # buckets' groups take every count-th parameter; the op wants each group's tensors consecutive.
    groups = [g["params"] for g in buckets.param_groups(params, workload.groups)]
    lrs = [g["lr"] for g in buckets.param_groups(params, workload.groups)]
    order = {id(p): i for i, p in enumerate(params)}
    flat = [p for group in groups for p in group]
    flat_grads = [grads[order[id(p)]] for p in flat]
    sizes = [len(group) for group in groups]
    steps = [torch.zeros((), dtype=torch.float32) for _ in flat]
    n = len(groups)
    if optimizer == "adam":
        exp_avgs = [torch.zeros_like(p) for p in flat]
        exp_avg_sqs = [torch.zeros_like(p) for p in flat]
        beta1, beta2 = DEFAULTS["betas"]
        hyper = [x for lr in lrs for x in (lr, beta1, beta2, DEFAULTS["adam_eps"], 0.0)]
        return lambda: _ops.fused_adam_(flat, flat_grads, exp_avgs, exp_avg_sqs, [], steps, sizes, hyper, [None] * n,
                                        amsgrad=False, decoupled=False, maximize=False)
    sums = [torch.zeros_like(p) for p in flat]
    hyper = [x for lr in lrs for x in (lr, 0.0, DEFAULTS["adagrad_eps"], 0.0)]
    return lambda: _ops.fused_adagrad_(flat, flat_grads, sums, steps, sizes, hyper, [None] * n, maximize=False)


def _op_result(workload: buckets.BucketWorkload, optimizer: str, reference: list[torch.Tensor] | None,
               steps: int, warmup: int) -> buckets.BucketResult:
    params, grads = buckets.workload_tensors(workload, DEVICE)  # the same start and gradients as run_workload
    step = _op_step(optimizer, workload, params, grads)
    timer = StepTimer(DEVICE)
    for i in range(warmup + steps):
        timer(step, record=i >= warmup)
    check = "not checked" if reference is None else buckets.check_against(params, reference)
    return buckets.BucketResult(workload.name, optimizer, "recap-cpu-op", timer.samples_ms(), workload.numel,
                                len(workload.sizes), check)


def _reference_final(workload: buckets.BucketWorkload, optimizer: str, steps: int) -> list[torch.Tensor]:
    """torch's single-tensor path after ``steps`` steps from the benchmark's start (the check)."""
    params, grads = buckets.workload_tensors(workload, DEVICE)
    for p, g in zip(params, grads):
        p.grad = g
    opt = buckets.contenders(optimizer, DEVICE, backends=[])["torch-single"](buckets.param_groups(params, workload.groups))
    for _ in range(steps):
        opt.step()
    return [p.detach() for p in params]


def run_cpu_suite(threads: Sequence[int] | None = None, *, steps: int = 10, warmup: int = 2, scale: float = 1.0,
                  optimizers: Sequence[str] = OPTIMIZERS) -> list[dict[str, Any]]:
    """Rows for every thread count (default: 1 and all of torch's threads), workload, optimizer, contender.

    ``scale`` shrinks the ``single`` workload (quick runs). Raises if the cpu backend is unavailable.
    """
    from recap_kernels.backends import available_backends

    ok, why = available_backends(DEVICE)["cpu"]
    if not ok:
        raise RuntimeError(f"the cpu backend is unavailable: {why}")
    before = torch.get_num_threads()
    counts = list(threads) if threads else sorted({1, before})
    out: list[dict[str, Any]] = []
    try:
        for count in counts:
            torch.set_num_threads(count)
            first_roofline = buckets.measure_roofline(DEVICE)
            env = environment(DEVICE)
            measured = []
            for workload in buckets.workloads(DEVICE, scale):
                for optimizer in optimizers:
                    results = buckets.run_workload(workload, optimizer, DEVICE, steps=steps, warmup=warmup,
                                                   backends=["cpu"])
                    reference = _reference_final(workload, optimizer, warmup + steps)
                    results.append(_op_result(workload, optimizer, reference, steps, warmup))
                    measured.append(results)
            # On a shared machine one STREAM measurement can catch a busy moment (we have seen 15 and
            # 27 GB/s minutes apart), which would inflate every % of the run: the roofline is the
            # higher of a measurement before and one after the workloads.
            roofline = max(first_roofline, buckets.measure_roofline(DEVICE), key=lambda r: r["stream_gbps"])
            for results in measured:
                for row in buckets.rows(results, roofline, DEVICE, env):
                    row["threads"] = count
                    out.append(row)
    finally:
        torch.set_num_threads(before)
    return out


def format_cpu_suite(rows: list[dict[str, Any]]) -> str:
    """One table per thread count, in buckets' format."""
    parts = []
    for count in sorted({r["threads"] for r in rows}):
        mine = [r for r in rows if r["threads"] == count]
        roofline = {"copy_gbps": mine[0]["copy_gbps"], "stream_gbps": mine[0]["stream_gbps"]}
        parts.append(f"\n{count} thread(s)" + buckets.format_rows(mine, roofline, DEVICE))
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("threads", nargs="*", type=int, help="thread counts (default: 1 and all)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    rows = run_cpu_suite(args.threads, steps=args.steps, warmup=args.warmup)
    print(format_cpu_suite(rows))
    return 0 if all(r["check"].startswith("OK") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
