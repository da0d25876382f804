"""Compile time and step time of a compiled optimizer step, against eager and torch's compiled foreach Adam.

    python bench/compile_time.py --tensors 500                       # ours eager and compiled, interleaved
    python bench/compile_time.py --tensors 500 --contender torch-foreach-compiled
    python bench/compile_time.py --tensors 20 --steps 400 --breakdown  # where a compiled step's time goes

The workload is issue 14's: fp32 tensors of 1 to 3,000 elements in 11 param groups with 11 learning
rates, every one with a gradient. Each run starts from a cold Inductor cache (a fresh
``TORCHINDUCTOR_CACHE_DIR``), takes one eager step (state), then times the first compiled step (the
compilation) and the median of ``--steps`` steps. ``ours`` times our eager and compiled steps
interleaved in one process, so both see the same machine; a torch contender runs alone (compiling
torch's foreach Adam takes minutes: run one per process). ``--breakdown`` adds, interleaved with those
two, the step's op called directly (what the compiled graph runs) and the step compiled with
``backend="eager"`` (Dynamo without AOTAutograd or Inductor): the differences are what each layer of
torch.compile's call costs (Note [Compiled steps] in recap_kernels/optim/_compiled.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="recap-compile-time-"))

import torch  # noqa: E402  (after the cache directory is set)

from recap_kernels import optim  # noqa: E402
from recap_kernels.optim._compiled import compiled_step  # noqa: E402

GROUPS = 11
CONTENDERS = {
    "ours": lambda groups: optim.Adam(groups, backend="cpu"),
    "torch-foreach-compiled": lambda groups: torch.optim.Adam(groups, foreach=True),
    "torch-fused": lambda groups: torch.optim.Adam(groups, fused=True),
}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=500)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--contender", choices=sorted(CONTENDERS), default="ours")
    parser.add_argument("--breakdown", action="store_true",
                        help="ours only: also time the op alone and the step compiled with Dynamo alone")
    args = parser.parse_args()
    if args.breakdown and args.contender != "ours":
        parser.error("--breakdown times our compiled step's layers: it needs --contender ours")

    torch.manual_seed(0)
    sizes = torch.randint(1, 3001, (args.tensors,)).tolist()
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    groups = [{"params": params[i::GROUPS], "lr": 1e-3 * (1 + i / GROUPS)} for i in range(GROUPS)]
    opt = CONTENDERS[args.contender](groups)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the state, eagerly

    steps = {}
    if args.contender != "torch-fused":
        compiled = torch.compile(opt.step)
        compile_s = _timed(compiled)
        steps["compiled"] = compiled
    if args.contender in ("ours", "torch-fused"):
        steps["eager"] = opt.step
    if args.breakdown:
        steps["op alone"] = lambda: compiled_step(opt, None, None)  # the op, called outside any graph
        dynamo_only = torch.compile(opt.step, backend="eager")
        dynamo_only()
        steps["compiled, Dynamo only"] = dynamo_only
    samples = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            samples[name].append(_timed(step) * 1e3)
    print(f"{args.contender}, {args.tensors} tensors, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if "compiled" in steps:
        print(f"  compile (first compiled step): {compile_s:.2f} s")
    for name, values in samples.items():
        q = statistics.quantiles(values, n=10)
        print(f"  {name} step: p50 {statistics.median(values) * 1e3:.1f} us (p10 {q[0] * 1e3:.1f}, "
              f"p90 {q[-1] * 1e3:.1f})")
    if hasattr(opt, "backends_used"):
        print(f"  backends used: {sorted(opt.backends_used())}")


if __name__ == "__main__":
    main()
