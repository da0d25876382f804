"""The command line: ``python -m recap_kernels info | bench`` (also installed as ``recap-kernels``).

``info`` says what this install contains (what was compiled, for which GPU architectures) and
which backends can run here, with the reason for each one that cannot. ``bench`` is the main job:
it times the recap workload's optimizer step on every backend and checks that they agree (see
:mod:`recap_kernels.bench.run`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

# Timed and warmup steps when not given: enough for stable quantiles, few enough that the CPU run,
# one forward/backward per step included, stays well under two minutes.
DEFAULT_STEPS = {"cuda": 50, "cpu": 20}
DEFAULT_WARMUP = {"cuda": 5, "cpu": 3}
KERNEL_STEPS = {"cuda": 20, "cpu": 10}  # the kernel workloads time the step alone, with no forward/backward


def _triton_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _gpu() -> str:
    if not torch.cuda.is_available():
        return "none visible"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    major, minor = torch.cuda.get_device_capability(0)
    return f"{', '.join(names)} (sm_{major}{minor})"


def _count(minimum: int):
    """An argparse type: an int of at least ``minimum``."""

    def count(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}; got {value}")
        return value

    return count


def _section(title: str, pairs: list[tuple[str, str]]) -> list[str]:
    width = max(len(key) for key, _ in pairs)
    return [title] + [f"  {key.ljust(width)}  {value}" for key, value in pairs]


def info() -> int:
    from recap_kernels import __version__, _ext
    from recap_kernels.backends import available_backends

    build = _ext.build_info()
    module, why_not = _ext.load()
    lines = _section(
        f"recap_kernels {__version__}",
        [
            ("python", f"{platform.python_version()} ({sys.executable})"),
            ("torch", torch.__version__),
            ("torch CUDA", torch.version.cuda or "none (CPU-only build)"),
            ("triton", _triton_version()),
            ("GPU", _gpu()),
            ("CPU threads", str(torch.get_num_threads())),
        ],
    )
    lines.append("")
    lines += _section(
        "compiled (_build_info.json)" if build else "compiled (no _build_info.json: never built)",
        [
            ("cpu extension", "yes" if build.get("cpu_extension") else "no"),
            ("cuda extension", "yes" if build.get("cuda_extension") else "no"),
            ("cuda archs", ", ".join(build.get("cuda_archs", [])) or "none"),
            ("cuda adam order", {"opmath": "torch >= 2.11 fused CUDA Adam (fp32 hyperparameters, FMA moments)",
                                 "double": "torch < 2.11 fused CUDA Adam (double hyperparameters)"}.get(
                                     build.get("cuda_adam_order", ""), "n/a")),
            ("cuda adagrad order", {"torch-cuda": "torch >= 2.12 fused CUDA Adagrad (double hyperparameters)",
                                    "cpu": "torch's fused CPU Adagrad (torch < 2.12 has no fused CUDA one)"}.get(
                                        build.get("cuda_adagrad_order", ""), "n/a")),
            ("built against", f"torch {build['torch']}" if "torch" in build else "unknown"),
            ("notes", "; ".join(build.get("notes", [])) or "none"),
            ("_C", f"loaded from {module.__file__}" if module is not None else f"not loaded: {why_not}"),
        ],
    )
    lines.append("")
    backends = available_backends()
    width = max(len(name) for name in backends)
    lines.append("backends (each asked about the device it is meant for)")
    for name, (ok, reason) in backends.items():
        verdict = "available" if ok else f"unavailable: {reason}"
        lines.append(f"  {name.ljust(width)}  {verdict}")
    print("\n".join(lines))
    return 0


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, what: str):
    """A progress bar on stderr (tqdm, from the ``bench`` extra; none without it or off a terminal)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, desc=what, file=sys.stderr, leave=False, dynamic_ncols=True, disable=None)


def bench(args: argparse.Namespace) -> int:
    from recap_kernels.backends import BACKEND_NAMES
    from recap_kernels.bench import run, workloads

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda, but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        workload = workloads.workload_for_size(args.size, device)
        requested = args.backends.split(",") if args.backends else None
        contenders = run.select_contenders(requested, device)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    steps = DEFAULT_STEPS[device.type] if args.steps is None else args.steps
    warmup = DEFAULT_WARMUP[device.type] if args.warmup is None else args.warmup

    size_note = ""
    if args.size == "default" and workload.scale != 1:
        size_note = (
            f"(the {device.type} default is {workload.scale:g}x the full workload the GPU default runs; "
            f"--size 1 runs that here)"
        )
    started = time.perf_counter()
    all_rows, ok = [], True
    if args.suite in ("recap", "all"):
        print(f"bench: {', '.join(contenders)} on {device.type}, {warmup} + {steps} steps ...", file=sys.stderr,
              flush=True)
        kinds = ("sparse", "dense") if args.embedding_gradients == "both" else (args.embedding_gradients,)
        for i, kind in enumerate(kinds):  # the table's gradients as in training first, then dense ones
            bar = _progress(warmup + steps, f"recap, {kind} tables: {len(contenders)} contenders in lockstep")
            report = run.run(workload.with_embedding_gradients(kind), device, contenders, steps=steps, warmup=warmup,
                             tick=bar.update)
            bar.close()
            print(("\n" if i else "") + run.format_report(report, size_note))
            all_rows += run.rows(report)
            ok &= report.ok
    if args.suite in ("kernels", "all"):
        backends = [name for name in requested if name in BACKEND_NAMES] if requested else None
        kernel_rows = _kernel_suite(device, args, backends)
        all_rows += kernel_rows
        ok &= all(r["check"].startswith("OK") for r in kernel_rows)
    if args.suite in ("embedding", "all"):
        embedding_rows = _embedding_suite(device, args)
        all_rows += embedding_rows
        ok &= all(r["check"] == "-" or r["check"].startswith("OK") for r in embedding_rows)
    print(
        f"\nbench took {time.perf_counter() - started:.1f} s; "
        + ("every contender matches torch" if ok else "MISMATCH: see above")
    )
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(all_rows, indent=2) + "\n")
        print(f"wrote {path}")
    if args.plot:
        from recap_kernels.bench import report as bench_report

        print(f"wrote {bench_report.plot(bench_report.add_ratios(all_rows), args.plot)}")
    return 0 if ok else 1


def _kernel_suite(device: torch.device, args: argparse.Namespace, backends: list[str] | None) -> list[dict]:
    from recap_kernels.bench import buckets, run

    steps = KERNEL_STEPS[device.type] if args.steps is None else args.steps
    warmup = DEFAULT_WARMUP[device.type] if args.warmup is None else args.warmup
    print(f"bench: kernel workloads on {device.type}, {warmup} + {steps} steps ...", file=sys.stderr, flush=True)
    roofline = buckets.measure_roofline(device)
    results = []
    shapes = buckets.workloads(device, scale=1 / 16 if args.size == "small" else 1.0)
    compiled = args.compiled
    bar = _progress(len(shapes) * 2 * len(buckets.contenders("adam", device, backends, compiled)),
                    "kernels: contenders")
    for workload in shapes:
        for optimizer in ("adam", "adagrad"):
            results += buckets.run_workload(workload, optimizer, device, steps=steps, warmup=warmup,
                                            backends=backends, compiled=compiled, tick=bar.update)
    bar.close()
    table_rows = buckets.rows(results, roofline, device, run.environment(device))
    print(buckets.format_rows(table_rows, roofline, device))
    return table_rows


def _embedding_suite(device: torch.device, args: argparse.Namespace) -> list[dict]:
    from recap_kernels.bench import embedding, run

    steps = KERNEL_STEPS[device.type] if args.steps is None else args.steps
    warmup = DEFAULT_WARMUP[device.type] if args.warmup is None else args.warmup
    # The CPU table is already sized for a CPU: "default" runs it as it is, like the GPU's.
    scale = {"small": 1 / 16, "default": 1.0}.get(args.size) or float(args.size)
    print(f"bench: embedding tables on {device.type}, {warmup} + {steps} steps ...", file=sys.stderr, flush=True)
    bar = _progress(len(embedding.TOUCHED) * len(embedding.contenders(device)), "embedding: contenders")
    results = embedding.run_embedding_suite(device, steps=steps, warmup=warmup, scale=scale, tick=bar.update)
    bar.close()
    rows, dim = embedding.TABLES[device.type]
    table_rows = embedding.rows(results, run.environment(device), (max(1, int(rows * scale)), dim))
    print(embedding.format_rows(table_rows))
    return table_rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recap_kernels", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="what is compiled, for which GPU archs, which backends can run here")
    bench_parser = commands.add_parser(
        "bench", help="time the recap workload's optimizer step per backend and check the backends agree"
    )
    bench_parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    bench_parser.add_argument(
        "--steps",
        type=_count(1),
        help=f"timed steps (default: {DEFAULT_STEPS['cuda']} on cuda, {DEFAULT_STEPS['cpu']} on cpu)",
    )
    bench_parser.add_argument(
        "--warmup",
        type=_count(0),
        help=f"untimed steps first (default: {DEFAULT_WARMUP['cuda']} on cuda, {DEFAULT_WARMUP['cpu']} on cpu)",
    )
    bench_parser.add_argument(
        "--size",
        default="default",
        help="small, default (the full workload on cuda, a smaller one on cpu, as the output says) "
        "or a scale of the full workload, e.g. 0.5",
    )
    bench_parser.add_argument(
        "--backends",
        help="comma-separated backends and/or stock contenders (torch-foreach, torch-fused) to run; "
        "default: every available backend plus the stock contenders; the torch backend always runs as the reference",
    )
    bench_parser.add_argument(
        "--suite",
        choices=("recap", "kernels", "embedding", "all"),
        default="all",
        help="recap: the recap model's step per backend; kernels: Adam and Adagrad over one large tensor and "
        "over 5,000 small ones against torch's single-tensor/foreach/fused paths and the memory roofline; "
        "embedding: exact and row-wise Adagrad on one large table with sparse gradients of 16k/64k/256k rows, "
        "against torch's sparse and dense fused steps and FBGEMM's TBE when installed; all (default): the three",
    )
    bench_parser.add_argument(
        "--embedding-gradients",
        choices=("sparse", "dense", "both"),
        default="both",
        help="the recap suite's table gradients: sparse (nn.EmbeddingBag(sparse=True), as in training), dense, "
        "or both (default: two tables, sparse first)",
    )
    bench_parser.add_argument("--compiled", action="store_true",
                              help="kernels suite: also time each kernel backend's step under torch.compile "
                                   "(recap-<backend>-compiled rows, with the compile time)")
    bench_parser.add_argument("--json", metavar="PATH", help="also write long-format result rows to PATH")
    bench_parser.add_argument("--plot", metavar="PATH",
                              help="also draw the rows to PATH (PNG): time per step per contender, roofline marked")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        return info()
    return bench(args)
