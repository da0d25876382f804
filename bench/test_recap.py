"""The recap model (recap_kernels.bench.workloads): its optimizer step per backend and for stock
torch.optim foreach/fused, then the whole training step (forward + backward + step + scheduler)."""

import pytest
import torch

from recap_kernels.bench import cases, workloads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("contender", cases.recap_contenders(DEVICE))
@pytest.mark.parametrize("training", [False, True], ids=["step", "train"])
@pytest.mark.parametrize("gradients", ["sparse", "dense"], ids=["sparse-tables", "dense-tables"])
def test_recap(time_case, bench_device, bench_small, gradients, training, contender):
    if contender not in cases.recap_contenders(bench_device):
        pytest.skip(f"{contender} does not run on {bench_device.type}")
    workload = workloads.workload_for_size("small" if bench_small else "default", bench_device)
    time_case(cases.recap_case(workload.with_embedding_gradients(gradients), contender, bench_device,
                               training=training))
