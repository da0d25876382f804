"""The pytest-benchmark suite's fixtures (``make bench``; see bench/README.md).

Every test builds one case of :mod:`recap_kernels.bench.cases` (the workloads and checks of
``python -m recap_kernels bench``), fails when the case does not match its reference, and only then
times it with ``benchmark.pedantic``: warm-up rounds first, one step per round on the CPU, and on
CUDA several steps per round closed by a synchronize (the round's time divided by its steps, and
CUDA-event times per step, go into ``extra_info``). Every result carries what a reader needs:
bytes moved, GB/s, the roofline measured in the same session, the machine, versions and commit.

Options: ``--bench-device cpu|cuda`` (default: cuda when available), ``--bench-size small|default``
(small: a quick run for checking the suite itself).
"""

from __future__ import annotations

import pytest
import torch

from recap_kernels.bench import buckets, run
from recap_kernels.bench.cases import Case
from recap_kernels.bench.timing import quantiles

# Rounds of pedantic: (warm-up rounds, timed rounds, steps per round) per device.
ROUNDS = {"cpu": (2, 10, 1), "cuda": (3, 20, 5)}


def pytest_addoption(parser):
    group = parser.getgroup("recap_kernels bench")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="device to benchmark (default: cuda when available, else cpu)")
    group.addoption("--bench-size", choices=("small", "default"), default="default",
                    help="small: shrunken workloads, to check the suite itself")


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    name = pytestconfig.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda, but no CUDA device is available")
    return torch.device(name)


@pytest.fixture(scope="session")
def bench_small(pytestconfig) -> bool:
    return pytestconfig.getoption("--bench-size") == "small"


@pytest.fixture(scope="session")
def roofline(bench_device) -> dict[str, float]:
    """The memory roofline of this device, measured once per session (copy on CUDA, in-place STREAM on CPU)."""
    measured = buckets.measure_roofline(bench_device)
    key = buckets.roofline_key(bench_device)
    return {**measured, "roofline": key.removesuffix("_gbps"), "roofline_gbps": measured[key]}


@pytest.fixture(scope="session")
def environment(bench_device) -> dict:
    return run.environment(bench_device)


@pytest.fixture
def time_case(benchmark, roofline, environment, bench_small):
    """``time_case(case)``: fail on a mismatch, else time ``case.step`` and record the row."""

    def time_case(case: Case) -> None:
        if case.check != "OK":
            pytest.fail(f"{case.contender} does not match its reference on {case.workload}: {case.check}")
        warmup, rounds, per_round = ROUNDS[case.device.type]
        if bench_small:
            warmup, rounds = 1, 3
        cuda = case.device.type == "cuda"
        events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

        def one_round() -> None:
            for _ in range(per_round):
                if cuda:  # events bracket each step; nothing waits until the round's end
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    case.step()
                    end.record()
                    events.append((start, end))
                else:
                    case.step()
            if cuda:
                torch.cuda.synchronize(case.device)

        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup, iterations=1)
        stats = benchmark.stats.stats
        step_ms = sorted(x * 1e3 / per_round for x in stats.data)
        info = {**case.info(), **environment, **roofline, "steps_per_round": per_round}
        info["p50"], info["p20"], info["p80"] = quantiles(step_ms)
        if cuda:
            event_ms = [start.elapsed_time(end) for start, end in events[-rounds * per_round:]]
            info["cuda_event_p50"], info["cuda_event_p20"], info["cuda_event_p80"] = quantiles(event_ms)
        if case.bytes:
            info["gbps"] = case.bytes / (info["p50"] * 1e6)
            info["frac_of_roofline"] = info["gbps"] / roofline["roofline_gbps"]
        benchmark.extra_info.update(info)
        benchmark.group = f"{case.suite}: {case.workload} {case.optimizer}"

    return time_case
