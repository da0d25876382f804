"""``python -m recap_kernels info | bench``: what they print and write, never how fast anything ran."""

import json
import subprocess
import sys
from functools import partial

import pytest
import torch

from recap_kernels._cli import main
from recap_kernels.backends import BACKEND_NAMES, get_backend
from recap_kernels.bench import run, workloads
from recap_kernels.builder import build_optimizer

TINY_BENCH = ["bench", "--device", "cpu", "--suite", "recap", "--size", "small", "--steps", "2", "--warmup", "1"]


def test_info_reports_versions_build_and_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for text in (torch.__version__, "cpu extension", "cuda extension", "cuda archs", "_C", *BACKEND_NAMES):
        assert text in out


@pytest.mark.parametrize("adagrad_order,shown", [("torch-cuda", "torch >= 2.12 fused CUDA Adagrad"),
                                                  ("cpu", "torch's fused CPU Adagrad")])
def test_info_shows_the_torch_cuda_orders_the_kernels_were_built_for(monkeypatch, capsys, adagrad_order, shown):
    from recap_kernels import _ext

    build = {**_ext.build_info(), "cuda_adam_order": "opmath", "cuda_adagrad_order": adagrad_order}
    monkeypatch.setattr(_ext, "build_info", lambda: build)
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    adam = next(i for i, line in enumerate(lines) if "cuda adam order" in line)
    assert "torch >= 2.11 fused CUDA Adam" in lines[adam]
    assert "cuda adagrad order" in lines[adam + 1] and shown in lines[adam + 1]


def test_module_entry_point_runs_info():
    result = subprocess.run(
        [sys.executable, "-m", "recap_kernels", "info"], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "backends" in result.stdout


def test_bench_writes_rows_that_pass_the_check(tmp_path, capsys):
    path = tmp_path / "rows.json"
    assert main([*TINY_BENCH, "--backends", "torch,torch-fused", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for name in BACKEND_NAMES:
        assert name in out
    rows = {row["contender"]: row for row in json.loads(path.read_text())}
    assert set(rows) == {"recap-torch", "torch-fused"}
    reference = rows["recap-torch"]
    assert reference["backend"] == "torch" and reference["backends_used"] == ["torch"]
    assert reference["check"] == rows["torch-fused"]["check"] == "OK"
    assert 0 < reference["p20"] <= reference["p50"] <= reference["p80"]
    assert reference["n_params"] > 0 and reference["gbps"] > 0
    assert 20 < reference["bytes_per_param"] < 28  # a mix of Adam (28 B) and Adagrad (20 B) parameters


def test_kernel_suite_rows(tmp_path, capsys):
    path = tmp_path / "rows.json"
    args = ["bench", "--device", "cpu", "--suite", "kernels", "--size", "small", "--steps", "1", "--warmup", "0"]
    assert main([*args, "--backends", "torch", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert {(r["workload"], r["optimizer"]) for r in rows} == {
        (w, o) for w in ("single", "many-small", "tiny") for o in ("adam", "adagrad")
    }
    assert {r["contender"] for r in rows} == {"torch-single", "torch-foreach", "torch-fused"}
    assert all(r["check"].startswith("OK") and r["gbps"] > 0 and r["roofline_gbps"] > 0 for r in rows)
    many = next(r for r in rows if r["workload"] == "many-small")
    assert many["n_tensors"] == 5000 and many["bytes_per_param"] in (20, 28)
    tiny = {(r["optimizer"], r["contender"]): r["p50"] for r in rows if r["workload"] == "tiny"}
    assert all(r["host_ms"] == tiny[r["optimizer"], r["contender"]] for r in rows)  # the host column
    assert "in-place STREAM" in capsys.readouterr().out


@pytest.mark.skipif(not get_backend("cpu").available(torch.device("cpu")).ok, reason="no CPU kernels in this build")
def test_kernel_suite_times_compiled_steps_with_their_compile_time():
    from recap_kernels.bench import buckets

    workload = buckets.BucketWorkload("few", (3, 50, 7), 2)
    results = buckets.run_workload(workload, "adam", torch.device("cpu"), steps=2, warmup=1, backends=["cpu"],
                                   compiled=True)
    by_name = {r.contender: r for r in results}
    assert by_name["recap-cpu-compiled"].check == "OK" and len(by_name["recap-cpu-compiled"].samples_ms) == 2
    assert by_name["recap-cpu-compiled"].compile_s > 0 and by_name["recap-cpu"].compile_s is None


def test_bench_fails_on_a_contender_that_disagrees(monkeypatch, capsys):
    # Weight decay the reference does not have: the parameters must come out different.
    wrong = partial(run._stock_torch, partial(torch.optim.Adam, weight_decay=0.5), torch.optim.Adagrad)
    monkeypatch.setitem(run.CONTENDERS, "torch-fused", run.Contender("torch-fused", wrong))
    assert main([*TINY_BENCH, "--backends", "torch-fused"]) == 1
    assert "MISMATCH torch-fused" in capsys.readouterr().out


def test_bench_rejects_unknown_and_unavailable_backends(capsys):
    assert main([*TINY_BENCH, "--backends", "numpy"]) == 2
    assert "unknown backend" in capsys.readouterr().err
    assert main([*TINY_BENCH, "--backends", "cuda"]) == 2
    assert "cannot run on cpu" in capsys.readouterr().err


def test_workload_groups_like_a_recap_model():
    workload = workloads.workload_for_size("small", torch.device("cpu"))
    model = workloads.build_model(workload, "cpu")
    optimizer, _ = build_optimizer(model, *workloads.load_optimizer_configs(), backend="torch")
    names = [group["name"] for group in optimizer.param_groups]
    assert names == [*workload.tasks, "backbone", "embeddings"]
    assert len(workload.tasks) == 10
    assert any(".recap__engagement__is_clicked." in name for name, _ in model.named_parameters())


@pytest.mark.gpu
def test_bench_on_cuda_agrees_across_every_available_backend(tmp_path):
    path = tmp_path / "rows.json"
    assert main(["bench", "--device", "cuda", "--size", "small", "--steps", "3", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert {"recap-torch", "torch-fused"} <= {row["contender"] for row in rows}
    assert all(row["check"] == "OK" and row["device"] == "cuda" for row in rows)


def test_embedding_suite_rows_pass_their_checks():
    from recap_kernels.bench import embedding
    from recap_kernels.bench.run import environment

    device = torch.device("cpu")
    results = embedding.run_embedding_suite(device, steps=1, warmup=0, scale=0.001, touched=(256, 1024))
    rows = embedding.rows(results, environment(device), (2000, 64))
    contenders = {r["contender"] for r in rows}
    assert {"torch-sparse", "torch-dense-fused", "recap-torch rowwise", "torch-fwd-bwd"} <= contenders
    assert {r["touched"] for r in rows} == {256, 1024}
    assert all(r["check"] == "-" or r["check"].startswith("OK") for r in rows), [r["check"] for r in rows]
    sparse = next(r for r in rows if r["contender"] == "torch-sparse")
    assert sparse["speedup_vs_torch_sparse"] == 1.0 and sparse["with_forward_backward_ms"] > sparse["p50"]
    assert "torch-fwd-bwd" in embedding.format_rows(rows)
    assert embedding._check(torch.zeros(3), torch.ones(3)).startswith("MISMATCH")


def test_recap_suite_runs_sparse_then_dense_table_gradients(tmp_path, capsys):
    path = tmp_path / "rows.json"
    # torch-fused: torch's fused Adagrad takes no sparse gradients, so its table steps sparse Adagrad
    assert main([*TINY_BENCH, "--backends", "cpu,torch-fused", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sparse Adagrad:" in out and "MISMATCH" not in out
    rows = json.loads(path.read_text())
    by_workload = {}
    for row in rows:
        by_workload.setdefault(row["workload"], {})[row["contender"]] = row
    assert list(by_workload) == ["recap-x0.0625", "recap-x0.0625-dense-tables"]
    sparse, dense = by_workload.values()
    assert set(sparse) == set(dense) == {"recap-torch", "recap-cpu", "torch-fused"}
    assert all(r["check"] == "OK" for r in rows)
    # the sparse step updates only the rows a batch names: fewer parameters, fewer bytes
    assert sparse["recap-torch"]["n_params"] < dense["recap-torch"]["n_params"]
    assert "cpu" in sparse["recap-cpu"]["backends_used"]


def test_workload_tables_get_the_configured_gradients():
    workload = workloads.workload_for_size("small", torch.device("cpu"))
    assert workload.embedding_gradients == "sparse"
    for kind in ("sparse", "dense"):
        model = workloads.build_model(workload.with_embedding_gradients(kind), "cpu")
        model(workloads.make_batches(workload, "cpu")[0]).backward()
        assert model.embedding_bags["user_id"].weight.grad.is_sparse == (kind == "sparse")
    with pytest.raises(ValueError, match="'sparse' or 'dense'"):
        workload.with_embedding_gradients("rowwise")
