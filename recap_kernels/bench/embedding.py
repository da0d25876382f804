"""Embedding-table benchmark: one table's optimizer step with sparse gradients.

A table of 2,000,000 x 64 fp32 rows on CPU (10,000,000 x 128 on CUDA) gets, each step, the sparse
gradient ``EmbeddingBag(mode="sum", sparse=True)`` produces for 16k, 64k or 256k indices in bags of
4 (skewed, so rows repeat): uncoalesced, one gradient row per index. The step's cost should follow
the indices, not the table.

Exact Adagrad: torch.optim.Adagrad's sparse step (the reference), ours on every kernel backend that
runs sparse tables here, and torch's fused Adagrad on the same gradient made dense (the dense
gradient is built outside the timed region). Row-wise Adagrad: ours on every backend (the torch
backend's is the reference). With ``fbgemm-gpu-cpu`` installed (CPU only), FBGEMM's table-batched
embedding with EXACT_ADAGRAD / EXACT_ROWWISE_ADAGRAD, whose update is fused into the backward: its
rows time forward + backward, so the ``+ fwd/bwd`` column adds torch's EmbeddingBag forward + backward
(timed alone, ``torch-fwd-bwd``) to every step-only row, which is what a training step costs.

Every contender runs the same batches from the same start and must end where its reference ends
(``check``), for the whole table, untouched rows included. A family's contenders take turns, one step
each, each on its own table and state: on a shared machine whose load drifts, the drift falls on all of
them, so their ratios hold (timed one after the other, the 64k ratio varied from 8.9x to 10.7x between
three runs on the bench machine).
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from recap_kernels import optim
from recap_kernels.backends import BucketKey, get_backend
from recap_kernels.backends._base import SPARSE
from recap_kernels.bench.timing import StepTimer, quantiles

TABLES = {"cpu": (2_000_000, 64), "cuda": (10_000_000, 128)}
TOUCHED = (16_384, 65_536, 262_144)
BAG = 4
BATCHES = 2  # distinct batches, cycled
LR, EPS, INIT = 0.05, 1e-8, 0.1


@dataclass(frozen=True)
class Batch:
    indices: torch.Tensor  # int64 [n]
    offsets: torch.Tensor  # bag starts
    upstream: torch.Tensor  # d loss / d bag output, [bags, dim]

    def sparse_grad(self, shape: tuple[int, int]) -> torch.Tensor:
        """What EmbeddingBag(mode="sum", sparse=True)'s backward produces: one row per index."""
        values = self.upstream.repeat_interleave(BAG, dim=0)[: self.indices.numel()]
        return torch.sparse_coo_tensor(self.indices[None], values, shape, check_invariants=False)


def make_batches(rows: int, dim: int, touched: int, device: torch.device, seed: int = 0) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(BATCHES):
        indices = (torch.rand(touched, generator=gen) ** 2 * rows).long()  # skewed toward low rows: repeats
        offsets = torch.arange(0, touched, BAG)
        upstream = torch.randn(offsets.numel(), dim, generator=gen)
        out.append(Batch(indices.to(device), offsets.to(device), upstream.to(device)))
    return out


@dataclass
class Result:
    family: str  # "adagrad" | "rowwise"
    touched: int
    contender: str
    samples_ms: list[float]
    check: str
    fused_backward: bool = False  # FBGEMM: the time is forward + backward with the update inside


def _table_backends(kind: str, device: torch.device) -> list[str]:
    key = BucketKey(device, torch.float32, SPARSE)
    names = []
    for name in ("cuda", "triton", "cpu", "torch"):
        backend = get_backend(name)
        if backend.available(device).ok and backend.supports(kind, key, [{}]).ok:
            names.append(name)
    return names


def _time_steps(device: torch.device, step: Callable[[int], None], steps: int, warmup: int) -> list[float]:
    return _time_interleaved(device, [step], steps, warmup)[0]


def _time_interleaved(device: torch.device, steppers: list[Callable[[int], None]], steps: int,
                      warmup: int) -> list[list[float]]:
    """Each stepper's samples, the steppers taking turns step by step: on a shared machine whose load
    drifts, the drift falls on every contender of a family alike, so their ratios hold."""
    timers = [StepTimer(device) for _ in steppers]
    for i in range(warmup + steps):
        for timer, step in zip(timers, steppers):
            timer(lambda: step(i), record=i >= warmup)
    return [timer.samples_ms() for timer in timers]


def _check(table: torch.Tensor, reference: torch.Tensor) -> str:
    try:
        torch.testing.assert_close(table, reference)
    except AssertionError as exc:
        return "MISMATCH: " + str(exc).splitlines()[1 if len(str(exc).splitlines()) > 1 else 0]
    return "OK"


def initial_table(device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """The table every contender starts from: :data:`TABLES`'s shape, rows times ``scale``."""
    rows, dim = TABLES[device.type]
    rows = max(1, int(rows * scale))
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(1)).to(device)


def contender_stepper(init: torch.Tensor, contender: str, batches: list[Batch]):
    """``(table, step)``: a copy of ``init`` under the contender's optimizer, and ``step(i)``, which
    sets batch ``i``'s gradient (made dense for a dense contender) and steps."""
    make_opt, dense = optimizer_factory(contender)
    table = init.clone().requires_grad_()
    opt = make_opt([table])
    grads = [b.sparse_grad(tuple(init.shape)) for b in batches]
    if dense:
        grads = [g.to_dense() for g in grads]

    def step(i: int) -> None:
        table.grad = grads[i % len(grads)]
        opt.step()

    return table, step


def _fbgemm_contender(init: torch.Tensor, optimizer: str, batches, device, steps, warmup):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    rows, dim = init.shape
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=getattr(EmbOptimType, optimizer), learning_rate=LR, eps=EPS, pooling_mode=PoolingMode.SUM,
        weights_precision=SparseType.FP32)
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(init)
        for state in tbe.split_optimizer_states()[0]:
            state.fill_(INIT)  # the momentum starts where initial_accumulator_value starts ours

    def step(i: int) -> None:
        b = batches[i % len(batches)]
        offsets = torch.cat([b.offsets, torch.tensor([b.indices.numel()])])
        tbe(b.indices, offsets).backward(b.upstream)

    samples = _time_steps(device, step, steps, warmup)
    return tbe.split_embedding_weights()[0].detach().clone(), samples


def _forward_backward_ms(init: torch.Tensor, batches, device, steps, warmup) -> list[float]:
    table = init.clone().requires_grad_()

    def step(i: int) -> None:
        b = batches[i % len(batches)]
        F.embedding_bag(b.indices, table, b.offsets, mode="sum", sparse=True).backward(b.upstream)
        table.grad = None

    return _time_steps(device, step, steps, warmup)


def _have_fbgemm() -> bool:
    try:
        import fbgemm_gpu.split_table_batched_embeddings_ops_training  # noqa: F401
    except Exception:  # not installed, or its CUDA build without a GPU
        return False
    return True


REFERENCES = {"adagrad": "torch-sparse", "rowwise": "recap-torch rowwise"}  # each family's reference


def contenders(device: torch.device) -> list[tuple[str, str]]:
    """``(family, contender)`` in the order they run, each family's reference first: exact Adagrad (torch's
    sparse step, ours per backend, torch's fused step on the gradient made dense) and row-wise Adagrad
    (the torch backend's, then ours per kernel backend)."""
    pairs = [("adagrad", "torch-sparse")]
    pairs += [("adagrad", f"recap-{b}") for b in _table_backends("adagrad", device) if b != "torch"]
    pairs += [("adagrad", "torch-dense-fused"), ("rowwise", "recap-torch rowwise")]
    pairs += [("rowwise", f"recap-{b} rowwise") for b in _table_backends("rowwise_adagrad", device) if b != "torch"]
    return pairs


def optimizer_factory(contender: str) -> tuple[Callable, bool]:
    """``(make, dense)``: ``make(params)`` builds the contender's optimizer; ``dense``: it steps the gradient
    made dense."""
    kw = {"lr": LR, "eps": EPS, "initial_accumulator_value": INIT}
    if contender == "torch-sparse":
        return (lambda ps: torch.optim.Adagrad(ps, **kw)), False
    if contender == "torch-dense-fused":
        return (lambda ps: torch.optim.Adagrad(ps, fused=True, **kw)), True
    backend, _, rowwise = contender.removeprefix("recap-").partition(" ")
    cls = optim.RowWiseAdagrad if rowwise else optim.Adagrad
    return (lambda ps: cls(ps, backend=backend, **kw)), False


def run_embedding_suite(device: torch.device, *, steps: int = 10, warmup: int = 2, scale: float = 1.0,
                        touched: tuple[int, ...] = TOUCHED, tick: Callable[[], object] | None = None) -> list[Result]:
    """Every contender on every touched count; ``scale`` shrinks the table's rows (tests, quick runs)."""
    # torch.optim.Adagrad's sparse step builds sparse tensors without invariant checks, and says so.
    warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)
    init = initial_table(device, scale)
    rows, dim = init.shape
    fbgemm = device.type == "cpu" and _have_fbgemm()
    results = []
    for n in touched:
        batches = make_batches(rows, dim, n, device)
        references: dict[str, torch.Tensor] = {}
        for family in REFERENCES:  # a family's contenders take turns (_time_interleaved), its reference first
            names = [contender for f, contender in contenders(device) if f == family]
            steppers = [contender_stepper(init, contender, batches) for contender in names]
            samples = _time_interleaved(device, [step for _, step in steppers], steps, warmup)
            references[family] = steppers[0][0].detach()
            for i, (contender, (table, _), timed) in enumerate(zip(names, steppers, samples)):
                check = "OK (reference)" if i == 0 else _check(table.detach(), references[family])
                results.append(Result(family, n, contender, timed, check))
                if tick is not None:
                    tick()
            del steppers, table
            gc.collect()
        results.append(Result("-", n, "torch-fwd-bwd", _forward_backward_ms(init, batches, device, steps, warmup),
                              "-"))
        if fbgemm:
            for family, optimizer in (("adagrad", "EXACT_ADAGRAD"), ("rowwise", "EXACT_ROWWISE_ADAGRAD")):
                table, samples = _fbgemm_contender(init, optimizer, batches, device, steps, warmup)
                results.append(Result(family, n, f"fbgemm-tbe {optimizer}", samples,
                                      _check(table, references[family]), fused_backward=True))
                del table
                gc.collect()
    return results


def rows(results: list[Result], environment: dict[str, Any], table: tuple[int, int]) -> list[dict[str, Any]]:
    """Long-format rows: p50/p20/p80 of the timed region, x the torch-sparse step, and with fwd/bwd added."""
    p50 = {(r.touched, r.contender): quantiles(r.samples_ms)[0] for r in results}
    out = []
    for r in results:
        mid, low, high = quantiles(r.samples_ms)
        reference = p50[(r.touched, "torch-sparse")]
        forward_backward = p50[(r.touched, "torch-fwd-bwd")]
        training = mid if r.fused_backward or r.contender == "torch-fwd-bwd" else mid + forward_backward
        out.append({
            "suite": "embedding", "workload": f"{table[0]}x{table[1]} touched {r.touched}", "optimizer": r.family,
            "family": r.family, "rows": table[0], "dim": table[1], "touched": r.touched,
            "contender": r.contender, "dtype": "float32", "p50": mid, "p20": low, "p80": high, "unit": "ms",
            "speedup_vs_torch_sparse": reference / mid if r.family == "adagrad" and not r.fused_backward
            else float("nan"),
            "with_forward_backward_ms": training, "timed": "forward+backward" if r.fused_backward else "step",
            "check": r.check, **environment,
        })
    return out


def format_rows(table_rows: list[dict[str, Any]]) -> str:
    if not table_rows:
        return ""
    first = table_rows[0]
    lines = ["", f"embedding: one {first['rows']:,} x {first['dim']} fp32 table, sparse gradients of EmbeddingBag "
                 f"(sum, bags of {BAG}); p50 ms of the step (fbgemm: of forward + backward, the update fused in)"]
    header = ("touched", "family", "contender", "p50 ms", "x torch-sparse", "+ fwd/bwd ms", "check")
    table = [header] + [
        (f"{r['touched']:,}", r["family"], r["contender"], f"{r['p50']:.2f}",
         "" if r["speedup_vs_torch_sparse"] != r["speedup_vs_torch_sparse"] else f"{r['speedup_vs_torch_sparse']:.1f}",
         f"{r['with_forward_backward_ms']:.2f}", r["check"])
        for r in table_rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [c.ljust(w) if i in (1, 2, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.append("(+ fwd/bwd: the step plus torch's EmbeddingBag forward + backward on the same batch, timed alone: "
                 "what a training step costs, comparable with fbgemm's fused rows)")
    return "\n".join(lines)
