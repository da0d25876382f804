"""The benchmark suites as code: bench/ collects and runs under pytest-benchmark, a contender that
disagrees with its reference is never timed, and the report turns a saved run into the summary, rows
and a PNG. Never how fast anything ran (``make test`` runs no benchmark beyond these few tiny ones)."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from recap_kernels._cli import main
from recap_kernels.bench import buckets, cases, report

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("pytest_benchmark", reason="the bench extra is not installed")
CPU = torch.device("cpu")
ROW_FIELDS = {"workload", "optimizer", "contender", "device", "dtype", "p50", "p20", "p80", "bytes", "gbps",
              "roofline_gbps", "check"}


def _pytest_bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "bench", "-p", "no:cacheprovider", "--bench-device", "cpu",
                           "--bench-size", "small", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_the_bench_suite_collects_every_family():
    result = _pytest_bench("--collect-only", "-q", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for family in ("test_kernels.py::test_kernels[", "test_recap.py::test_recap[", "test_embedding.py::test_embedding["):
        assert family in result.stdout
    assert "torch-single" in result.stdout and "torch-foreach" in result.stdout and "torch-fused" in result.stdout


def test_a_saved_run_becomes_a_summary_rows_and_a_plot(tmp_path):
    storage = tmp_path / "results"
    result = _pytest_bench("-k", "tiny and adagrad and (torch-fused or torch-single)", "--benchmark-autosave",
                           f"--benchmark-storage=file://{storage}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = report.newest_run(storage)
    rows, _ = report.load_rows(storage)
    assert {r["contender"] for r in rows} == {"torch-single", "torch-fused"}
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["check"] == "OK" and row["device"] == "cpu" and row["p20"] <= row["p50"] <= row["p80"]
        assert row["bytes"] == 20 * 5000 and row["roofline_gbps"] > 0
    fused = next(r for r in rows if r["contender"] == "torch-fused")
    assert fused["speedup"] == 1.0 and fused["baseline"] == "torch-fused"
    assert report.main([str(storage)]) == 0
    assert json.loads(saved.with_name(saved.stem + ".rows.json").read_text())[0]["suite"] == "kernels"
    assert saved.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # compared with itself, the run passes the regression check
    again = _pytest_bench("-k", "tiny and adagrad and torch-fused", f"--benchmark-storage=file://{storage}",
                          f"--benchmark-compare={saved.name[:4]}", "--benchmark-compare-fail=median:1000%")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]


def test_a_contender_that_disagrees_is_never_timed(monkeypatch):
    wrong = {"torch-fused": partial(torch.optim.Adagrad, lr_decay=0.5)}  # not what the reference does
    original = buckets.contenders
    monkeypatch.setattr(buckets, "contenders", lambda *a, **k: {**original(*a, **k), **wrong})
    workload = cases.kernel_workload("many-small", CPU)
    case = cases.kernel_case(workload, "adagrad", "torch-fused", CPU)
    assert case.check == "MISMATCH"
    assert cases.kernel_case(workload, "adagrad", "torch-foreach", CPU).check == "OK"


@pytest.mark.skipif("recap-cpu" not in cases.kernel_contenders(CPU), reason="no CPU kernels in this build")
def test_a_compiled_contender_is_checked_and_reports_its_compile_time():
    workload = buckets.BucketWorkload("few", (3, 50, 7), 2)
    case = cases.kernel_case(workload, "adagrad", "recap-cpu-compiled", CPU)
    assert case.check == "OK" and case.notes["compile_s"] > 0 and case.info()["compile_s"] > 0
    case.step()


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
def test_embedding_and_recap_cases_check_against_their_references():
    case = cases.embedding_case("rowwise", "recap-torch rowwise", 256, CPU, scale=0.001)
    assert case.check == "OK" and case.bytes > 0
    case.step()
    exact = cases.embedding_case("adagrad", "torch-dense-fused", 256, CPU, scale=0.001)
    assert exact.check == "OK"


def test_cli_writes_json_and_plot(tmp_path, capsys):
    rows_path, plot_path = tmp_path / "r.json", tmp_path / "r.png"
    args = ["bench", "--device", "cpu", "--suite", "kernels", "--size", "small", "--steps", "1", "--warmup", "0",
            "--backends", "torch", "--json", str(rows_path), "--plot", str(plot_path)]
    assert main(args) == 0
    rows = json.loads(rows_path.read_text())
    assert ROW_FIELDS <= set(rows[0])
    assert plot_path.read_bytes()[:4] == b"\x89PNG"


def test_compile_time_script_times_every_layer_of_a_compiled_step():
    """bench/compile_time.py --breakdown: our compiled step, the eager one, the op alone and Dynamo alone,
    each with its median, and the compiled steps ran on the kernel backend."""
    run = subprocess.run([sys.executable, "bench/compile_time.py", "--tensors", "7", "--steps", "3", "--breakdown"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("compiled", "eager", "op alone", "compiled, Dynamo only"):
        assert f"  {name} step: p50 " in run.stdout, run.stdout
    assert "compile (first compiled step): " in run.stdout
    assert "backends used: ['cpu']" in run.stdout
    refused = subprocess.run([sys.executable, "bench/compile_time.py", "--contender", "torch-fused", "--breakdown"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "needs --contender ours" in refused.stderr
