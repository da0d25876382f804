"""Measure Triton launch shapes for the fused Adam kernel on scratch tensors (GPU only).

Why not ``@triton.autotune``: its tuning runs would update real parameters through the pointer
table, which ``restore_value`` cannot protect. This script times candidate shapes on throwaway
tensors instead; the winner for an architecture is to be frozen in ``launch_config`` of
``recap_kernels/_triton/multi_tensor.py`` with a comment citing the run.

    python bench/tune_triton.py            # prints one row per (workload, shape), best first
"""

from __future__ import annotations

import itertools
import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("tune_triton: needs a CUDA device", file=sys.stderr)
        return 2
    import triton
    import triton.language as tl

    from recap_kernels._triton import adam, multi_tensor

    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    towers = torch.exp(torch.rand(300, generator=gen) * torch.log(torch.tensor(1_048_576.0))).long().tolist()
    workloads = {"single-2^28": [2**28], "300-tensors": towers}
    src, dst = torch.empty(2**28, device=device), torch.empty(2**28, device=device)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100)
    copy_gbps = 2 * src.numel() * 4 / (copy_ms * 1e6)
    print(f"arch sm_{''.join(map(str, torch.cuda.get_device_capability()))} {torch.cuda.get_device_name()}; "
          f"copy {copy_gbps:.0f} GB/s")

    shapes = [multi_tensor.LaunchConfig(block, block * factor, warps)
              for block, factor, warps in itertools.product((1024, 2048, 4096), (1, 8), (4, 8))]
    rows = []
    for name, sizes in workloads.items():
        tensors = [[torch.randn(n, device=device) for n in sizes] for _ in range(4)]
        steps = [torch.zeros((), device=device) for _ in sizes]
        numel = sum(sizes)
        for shape in shapes:
            slots = [tensors[0], tensors[1], tensors[2], tensors[3], steps]  # param, grad, exp_avg, exp_avg_sq, step
            table = multi_tensor.TensorTable(multi_tensor.addresses_of(slots), sizes, [len(sizes)], shape, device)
            table.set_hyper([1e-3, 0.9, 0.999, 1e-8, 0.0], [None])  # one row: lr, beta1, beta2, eps, weight_decay

            def step(table=table):
                adam.adam_launch(table, dtype=tl.float32, math_dtype=tl.float32, amsgrad=False, decoupled=False,
                                 maximize=False)

            ms = triton.testing.do_bench(step, warmup=5, rep=50)
            rows.append((name, shape, ms, 28 * numel / (ms * 1e6)))
        del tensors
    for name in workloads:
        for workload, shape, ms, gbps in sorted((r for r in rows if r[0] == name), key=lambda r: r[2]):
            print(f"{workload:12s} block {shape.block_size:5d} chunk {shape.chunk_size:6d} warps {shape.num_warps}  "
                  f"{ms:8.3f} ms  {gbps:6.0f} GB/s  {100 * gbps / copy_gbps:4.0f}% of copy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
