"""Kernel workloads: Adam and Adagrad over one large tensor (``single``), 5,000 small tensors in 11
groups (``many-small``) and 5,000 one-element tensors (``tiny``, all host cost), for torch's
single-tensor, foreach and fused paths and every kernel backend available (recap_kernels.bench.buckets)."""

import pytest
import torch

from recap_kernels.bench import cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("contender", cases.kernel_contenders(DEVICE))
@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
@pytest.mark.parametrize("workload", ["single", "many-small", "tiny"])
def test_kernels(time_case, bench_device, bench_small, workload, optimizer, contender):
    if contender not in cases.kernel_contenders(bench_device):
        pytest.skip(f"{contender} does not run on {bench_device.type}")
    shape = cases.kernel_workload(workload, bench_device, scale=1 / 16 if bench_small else 1.0)
    time_case(cases.kernel_case(shape, optimizer, contender, bench_device))
