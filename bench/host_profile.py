"""Where a CPU step's host time goes, on the tiny workload (5,000 one-element fp32 tensors in 11
groups, every step all host cost).

    python bench/host_profile.py              # our step against torch fused, then the breakdown
    python bench/host_profile.py --compare    # the first part only: runs on any version of the package

The first part uses only the public API (so it times an older checkout the same way: run it with
``PYTHONPATH`` set to that checkout). The breakdown times the cached step's parts one by one, each
the median of 200 calls: the plan's Python check (``_Plan.current``), the bound buckets' C++ gather,
the update kernels (the step minus the same step with ``found_inf`` set, which skips the update
but still gathers and bumps version counters), the version bumps, and what is left (the Python of
the optimizer step: torch's step wrapper, the structure key, hyperparameter rows); then cProfile's
top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

from recap_kernels import optim

TENSORS, GROUPS = 5000, 11


def _groups(params):
    n = len(params)
    return [{"params": params[i * n // GROUPS:(i + 1) * n // GROUPS], "lr": 1e-3 * (1 + i)} for i in range(GROUPS)]


def _params(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(1, generator=gen).requires_grad_() for _ in range(TENSORS)]
    for p in params:
        p.grad = torch.randn(1, generator=gen)
    return params


def _median_ms(fn, calls: int = 200, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def compare() -> None:
    for name, ours, stock in (("adam", optim.Adam, torch.optim.Adam), ("adagrad", optim.Adagrad, torch.optim.Adagrad)):
        recap = _median_ms(ours(_groups(_params()), backend="cpu").step, calls=40)
        fused = _median_ms(stock(_groups(_params()), fused=True).step, calls=40)
        print(f"tiny {name:8s} recap-cpu {recap:7.3f} ms   torch fused {fused:7.2f} ms   x{fused / recap:5.1f}")


def breakdown() -> None:
    opt = optim.Adam(_groups(_params()), backend="cpu")
    for _ in range(5):
        opt.step()
    plan = opt._plan_cache
    runs = [run for _, bucket in plan.entries for run in bucket.runs]
    found_inf = torch.ones(())

    def bound_steps(found_inf=None):
        for run in runs:
            hyper, lr_tensors = run.hyper
            run.bound.gather()
            run.bound.adam_step(hyper, lr_tensors, False, False, False, None, found_inf)

    step = _median_ms(opt.step)
    check = _median_ms(lambda: plan.current(opt, opt._structure_key()))
    gather = _median_ms(lambda: [run.bound.gather() for run in runs])
    updated = _median_ms(bound_steps)
    skipped = _median_ms(lambda: bound_steps(found_inf))
    print(f"Adam step {step:.3f} ms: plan check (Python) {check:.3f}, gather (C++) {gather:.3f}, "
          f"update kernels {updated - skipped:.3f}, version bumps {skipped - gather:.3f}, "
          f"optimizer Python and the rest {step - updated - check:.3f}")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        opt.step()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(8)
    print(out.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", action="store_true", help="only our step against torch fused")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{TENSORS} one-element fp32 tensors, {GROUPS} groups, {args.threads} threads")
    compare()
    if not args.compare:
        breakdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
