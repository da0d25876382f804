"""One embedding table with sparse gradients (recap_kernels.bench.embedding): exact Adagrad (torch's
sparse step, ours per backend, torch's fused step on the gradient made dense) and row-wise Adagrad per
backend, at 16k, 64k and 256k touched indices."""

import pytest
import torch

from recap_kernels.bench import cases, embedding

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("family,contender", cases.embedding_contenders(DEVICE))
@pytest.mark.parametrize("touched", embedding.TOUCHED)
def test_embedding(time_case, bench_device, bench_small, touched, family, contender):
    if (family, contender) not in cases.embedding_contenders(bench_device):
        pytest.skip(f"{contender} does not run on {bench_device.type}")
    scale = 1 / 16 if bench_small else 1.0
    time_case(cases.embedding_case(family, contender, touched // 16 if bench_small else touched, bench_device,
                                   scale=scale))
