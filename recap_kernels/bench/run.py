"""The main job: time the recap workload's optimizer step on every backend, and check that they agree.

Every contender steps its own copy of the same model (same seed) in lockstep. Each training step
runs one forward and backward, on the reference contender's model (the ``torch`` backend), and
copies the gradients into every other copy, so all contenders see exactly the same gradients.
(Separate forward/backward passes would not: a one-ulp difference in a parameter flips a ReLU
somewhere, Adam's normalization turns that gradient change into a full ``lr``-sized update, and
the trajectories drift apart for reasons that have nothing to do with the kernels.) Only
``optimizer.step()`` is timed; ``scheduler.step()`` follows it, untimed.

After the last step each contender's parameters must match the reference's
(``torch.testing.assert_close`` defaults) and its ``backends_used()`` must be what was asked for;
a contender failing either is a MISMATCH, and the run fails.

Contenders are data (:data:`CONTENDERS`): a name and a function ``(model, optimizer_config,
emb_optimizer_config) -> (optimizer, scheduler)``. Besides ``build_optimizer`` on each backend,
stock ``torch.optim`` Adam and Adagrad (foreach and fused) run on the builder's groups and
schedules, so every row times the same work: the whole step, dense groups and embedding table.
torch's fused Adagrad takes no sparse gradients, so with sparse table gradients (the workload's
default) ``torch-fused`` steps the table with torch's default sparse Adagrad, as a user would.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recap_kernels import __version__
from recap_kernels.backends import BACKEND_NAMES, BucketKey, available_backends, get_backend
from recap_kernels.backends._base import SPARSE
from recap_kernels.bench.timing import StepTimer, device_name, quantiles
from recap_kernels.bench.workloads import Workload, build_model, load_optimizer_configs, make_batches
from recap_kernels.builder import CombinedOptimizer, build_optimizer
from recap_kernels.config import EmbeddingOptimizerConfig, RecapOptimizerConfig
from recap_kernels.schedules import RecapLRScheduler

REFERENCE = "recap-torch"
STOCK = ("torch-foreach", "torch-fused")

# Elements one step reads and writes per parameter: Adam reads p, g, m, v and writes p, m, v;
# Adagrad reads p, g, sum and writes p, sum. Times the element size: 28 and 20 bytes in fp32.
_ADAM_ACCESSES = 7
_ADAGRAD_ACCESSES = 5


def _stock_torch(
    adam: Callable,
    adagrad: Callable,
    model: nn.Module,
    config: RecapOptimizerConfig,
    emb_config: EmbeddingOptimizerConfig,
) -> tuple[CombinedOptimizer, RecapLRScheduler]:
    """``torch.optim``'s own Adam and Adagrad over the builder's param groups, driven by its schedules."""
    built, built_scheduler = build_optimizer(model, config, emb_config, backend="torch")

    def groups(optimizer):
        return [{"params": g["params"], "name": g["name"]} for g in optimizer.param_groups]

    dense = adam(groups(built.dense), betas=(config.adam.beta_1, config.adam.beta_2), eps=config.adam.epsilon)
    hp = emb_config.adagrad
    if _sparse_tables(model) and getattr(adagrad, "keywords", {}).get("fused"):
        adagrad = torch.optim.Adagrad  # `fused` does not support sparse grad: torch's sparse Adagrad
    embedding = adagrad(
        groups(built.embedding),
        lr_decay=hp.lr_decay,
        weight_decay=hp.weight_decay,
        initial_accumulator_value=hp.initial_accumulator_value,
        eps=hp.eps,
    )
    optimizer = CombinedOptimizer(dense, embedding)
    return optimizer, RecapLRScheduler(optimizer, built_scheduler.lr_configs)


def _sparse_tables(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse for m in model.modules())


@dataclass(frozen=True)
class Contender:
    name: str
    build: Callable[..., tuple[CombinedOptimizer, RecapLRScheduler]]
    backend: str | None = None  # the recap_kernels backend asked for; None for stock torch.optim

    @property
    def expected_backends(self) -> set[str]:
        return {self.backend or "torch"}


def _recap(backend: str, model: nn.Module, config: RecapOptimizerConfig, emb_config: EmbeddingOptimizerConfig):
    """``build_optimizer`` on ``backend``; sparse tables go to ``auto`` where ``backend`` has no table kernels
    for this device (the report shows which backend stepped them)."""
    embedding_backend = backend
    if _sparse_tables(model):
        device = next(model.parameters()).device
        if not get_backend(backend).supports("adagrad", BucketKey(device, torch.float32, SPARSE), [{}]).ok:
            embedding_backend = "auto"
    return build_optimizer(model, config, emb_config, backend=backend, embedding_backend=embedding_backend)


CONTENDERS: dict[str, Contender] = {
    **{f"recap-{b}": Contender(f"recap-{b}", partial(_recap, b), b) for b in BACKEND_NAMES},
    "torch-foreach": Contender(
        "torch-foreach",
        partial(_stock_torch, partial(torch.optim.Adam, foreach=True), partial(torch.optim.Adagrad, foreach=True)),
    ),
    "torch-fused": Contender(
        "torch-fused",
        partial(_stock_torch, partial(torch.optim.Adam, fused=True), partial(torch.optim.Adagrad, fused=True)),
    ),
}


@dataclass(frozen=True)
class Traffic:
    """What one step updates: Adam over the dense groups, Adagrad over the embedding table.

    With sparse table gradients only the rows a gradient names are updated: ``embedding_params``
    counts their elements (in the last step's gradients), and the bytes are what an exact sparse
    step cannot avoid: each touched row's parameters and ``sum`` read and written, and every
    gradient row (duplicates included) and its index read.
    """

    dense_params: int
    dense_tensors: int
    embedding_params: int
    embedding_tensors: int
    bytes: int
    dtype: str
    embedding_rows: int = 0  # rows of the tables
    embedding_rows_touched: int | None = None  # rows a step updates; None with dense gradients

    @classmethod
    def of(cls, optimizer: CombinedOptimizer) -> Traffic:
        dense = [p for g in optimizer.dense.param_groups for p in g["params"]]
        emb = [p for g in optimizer.embedding.param_groups for p in g["params"]]
        emb_params = emb_bytes = 0
        touched = None
        for p in emb:
            grad = p.grad
            if grad is not None and grad.is_sparse:
                rows = grad.coalesce()._nnz()
                touched = (touched or 0) + rows
                width = p[0].numel()
                emb_params += rows * width
                emb_bytes += (4 * rows * width + grad._nnz() * width) * p.element_size() + grad._nnz() * 8
            else:
                emb_params += p.numel()
                emb_bytes += _ADAGRAD_ACCESSES * p.numel() * p.element_size()
        return cls(
            dense_params=sum(p.numel() for p in dense),
            dense_tensors=len(dense),
            embedding_params=emb_params,
            embedding_tensors=len(emb),
            bytes=sum(_ADAM_ACCESSES * p.numel() * p.element_size() for p in dense) + emb_bytes,
            dtype="+".join(sorted({str(p.dtype).removeprefix("torch.") for p in dense + emb})),
            embedding_rows=sum(p.shape[0] for p in emb),
            embedding_rows_touched=touched,
        )

    @property
    def params(self) -> int:
        return self.dense_params + self.embedding_params

    @property
    def tensors(self) -> int:
        return self.dense_tensors + self.embedding_tensors


@dataclass
class Result:
    contender: Contender
    samples_ms: list[float]
    traffic: Traffic
    backends_used: set[str]
    problems: list[str]  # empty when the contender agrees with the reference
    host_samples_ms: list[float] = field(default_factory=list)  # the host's time per step (on CUDA: enqueueing)

    @property
    def check(self) -> str:
        return "MISMATCH" if self.problems else "OK"


@dataclass
class Report:
    workload: Workload
    device: torch.device
    steps: int
    warmup: int
    environment: dict[str, Any]
    availability: dict[str, tuple[bool, str]]
    bandwidth_gbps: float
    results: list[Result] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(not r.problems for r in self.results)


def default_backends(device: torch.device) -> list[str]:
    """The backends timed unless others are asked for: every available one except Triton on CPU.

    Triton runs CPU tensors only through its interpreter, a testing tool many thousand times
    slower than a kernel; ``--backends triton`` still runs it.
    """
    return [
        name
        for name, (ok, _) in available_backends(device).items()
        if ok and not (name == "triton" and device.type == "cpu")
    ]


def select_contenders(requested: Sequence[str] | None, device: torch.device) -> list[str]:
    """The contenders to run, the reference first.

    Without ``requested``: every backend available on ``device`` plus the stock torch.optim
    contenders. ``requested`` names backends (``cpu``) or contenders (``torch-fused``); an unknown
    or unavailable one is a ``ValueError`` saying why. The reference always runs.
    """
    availability = available_backends(device)
    if requested is None:
        names = [f"recap-{b}" for b in default_backends(device)] + list(STOCK)
    else:
        names = []
        for name in requested:
            key = name if name in CONTENDERS else f"recap-{name}"
            if key not in CONTENDERS:
                raise ValueError(
                    f"unknown backend or contender {name!r}; choose from {', '.join([*BACKEND_NAMES, *STOCK])}"
                )
            backend = CONTENDERS[key].backend
            if backend is not None and not availability[backend][0]:
                raise ValueError(f"backend {backend!r} cannot run on {device}: {availability[backend][1]}")
            names.append(key)
    return list(dict.fromkeys([REFERENCE, *names]))


def run(
    workload: Workload,
    device: torch.device,
    contenders: Sequence[str],
    *,
    steps: int,
    warmup: int,
    tick: Callable[[], object] | None = None,
) -> Report:
    """Step every contender on the same gradients, timing each step; then check each against the first.

    ``tick()`` is called after every training step (a progress display)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0; got steps={steps}, warmup={warmup}")
    if not contenders or contenders[0] != REFERENCE:
        raise ValueError(f"the first contender must be the reference, {REFERENCE!r}; got {list(contenders)}")
    report = Report(
        workload,
        device,
        steps,
        warmup,
        environment(device),
        available_backends(device),
        measure_bandwidth(device),
    )
    configs = load_optimizer_configs()
    batches = make_batches(workload, device)

    models = [build_model(workload, device) for _ in contenders]
    built = [CONTENDERS[name].build(model, *configs) for name, model in zip(contenders, models, strict=True)]
    timers = [StepTimer(device) for _ in contenders]
    reference_model, (reference_optimizer, _) = models[0], built[0]
    reference_params = list(reference_model.parameters())
    for i in range(warmup + steps):
        reference_optimizer.zero_grad()
        reference_model(batches[i % len(batches)]).backward()
        for model, (optimizer, scheduler), timer in zip(models, built, timers, strict=True):
            if model is not reference_model:
                _copy_grads(model, reference_params)
            timer(optimizer.step, record=i >= warmup)
            scheduler.step()
        if tick is not None:
            tick()

    for name, model, (optimizer, _), timer in zip(contenders, models, built, timers, strict=True):
        contender = CONTENDERS[name]
        problems = [] if model is reference_model else _compare(model, reference_model)
        used = optimizer.backends_used()
        expected = contender.expected_backends
        embedding = getattr(optimizer, "embedding", None)
        if getattr(embedding, "backend", None) == "auto":  # tables its backend cannot run (_recap)
            expected = expected | embedding.backends_used()
        if used != expected:
            problems.insert(0, f"backends_used() is {sorted(used)}, expected {sorted(expected)}")
        report.results.append(Result(contender, timer.samples_ms(), Traffic.of(optimizer), used, problems,
                                     timer.host_samples_ms()))
    return report


def _copy_grads(model: nn.Module, grads_from: list[nn.Parameter]) -> None:
    # Copies, not shared tensors: no contender's step may see another one's writes.
    for p, source in zip(model.parameters(), grads_from, strict=True):
        if p.grad is None or source.grad.is_sparse:  # a sparse gradient is a new tensor every step
            p.grad = source.grad.clone()
        else:
            p.grad.copy_(source.grad)


def _compare(model: nn.Module, reference: nn.Module) -> list[str]:
    problems = []
    for (name, p), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
        try:
            torch.testing.assert_close(p, expected)
        except AssertionError as exc:
            details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
            problems.append(f"{name}: {'; '.join(details)}")
    return problems


def measure_bandwidth(device: torch.device, n: int = 1 << 26, repeats: int = 10) -> float:
    """GB/s of ``a += s * b * c`` in place on ``device``: the bandwidth a step can hope for, measured in this run.

    Like an optimizer step it reads several streams and writes one back where it was read, so no
    write-allocate traffic is hidden in the count (which makes a copy or an out-of-place triad
    look slower than a step can be). The 3 x 256 MiB of buffers exceed the last-level cache of GPUs
    and of most server CPUs; a workload whose state fits in a large cache can beat this figure.
    """
    a, b, c = (torch.rand(n, device=device) for _ in range(3))
    timer = StepTimer(device)
    for i in range(repeats + 1):
        timer(partial(a.addcmul_, b, c, value=1e-3), record=i > 0)
    return 4 * n * a.element_size() / (quantiles(timer.samples_ms())[0] * 1e6)


def environment(device: torch.device) -> dict[str, Any]:
    """What every row records about the machine and the software."""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return {
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "recap_kernels": __version__,
        "git_sha": _git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _git_sha() -> str | None:
    # Best effort: a source checkout knows its commit; an installed wheel does not.
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            check=False,
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def rows(report: Report) -> list[dict[str, Any]]:
    """The report as long-format rows, one per contender: what ``--json`` writes."""
    reference_p50 = quantiles(report.results[0].samples_ms)[0]
    out = []
    for r in report.results:
        p50, p20, p80 = quantiles(r.samples_ms)
        gbps = r.traffic.bytes / (p50 * 1e6)
        out.append(
            {
                "suite": "recap",
                "workload": report.workload.name,
                "optimizer": "adam+adagrad",
                "contender": r.contender.name,
                "backend": r.contender.backend,
                "dtype": r.traffic.dtype,
                "n_params": r.traffic.params,
                "n_tensors": r.traffic.tensors,
                "p50": p50,
                "p20": p20,
                "p80": p80,
                "unit": "ms",
                "bytes": r.traffic.bytes,
                "bytes_per_param": r.traffic.bytes / r.traffic.params,
                "params_per_s": r.traffic.params / (p50 * 1e-3),
                "gbps": gbps,
                "roofline_gbps": report.bandwidth_gbps,
                "frac_of_roofline": gbps / report.bandwidth_gbps,
                "time_vs_torch": p50 / reference_p50,
                "host_ms": quantiles(r.host_samples_ms)[0],
                "check": r.check,
                "backends_used": sorted(r.backends_used),
                "steps": report.steps,
                "warmup": report.warmup,
                **report.environment,
            }
        )
    return out


def format_report(report: Report, size_note: str = "") -> str:
    """The header and the table that ``python -m recap_kernels bench`` prints."""
    env, w = report.environment, report.workload
    traffic = report.results[0].traffic
    software = (
        f"torch {env['torch']} (CUDA {env['cuda'] or 'none'}), triton {env['triton'] or 'not installed'}, "
        f"python {env['python']}, git {env['git_sha'] or 'unknown'}"
    )
    model = (
        f"backbone {'-'.join(map(str, w.backbone_sizes))}, {len(w.tasks)} towers {'-'.join(map(str, w.tower_sizes))}, "
        + ", ".join(f"embedding_bags.{t} {n}x{d}" for t, n, d in w.embedding_bags)
        + f"; batch {w.batch_size}"
    )
    step = (
        f"Adam: {traffic.dense_params:,} params in {traffic.dense_tensors} tensors; "
        f"Adagrad: {traffic.embedding_params:,} params in {traffic.embedding_tensors} "
        f"tensor{'' if traffic.embedding_tensors == 1 else 's'}; "
        f"{traffic.bytes / 2**20:.0f} MiB moved (28 B/param Adam, 20 B/param Adagrad)"
    )
    if traffic.embedding_rows_touched is not None:
        step = (
            f"Adam: {traffic.dense_params:,} params in {traffic.dense_tensors} tensors; "
            f"sparse Adagrad: {traffic.embedding_rows_touched:,} of {traffic.embedding_rows:,} table rows "
            f"({traffic.embedding_params:,} params); {traffic.bytes / 2**20:.0f} MiB moved (28 B/param Adam; "
            "16 B/param of touched rows + gradient rows and indices)"
        )
    timing = (
        f"p50/p20/p80 of {report.steps} steps after {report.warmup} warmup; only optimizer.step() is timed, "
        "every contender on the same gradients"
    )
    ran = {r.contender.backend for r in report.results}
    width = max(map(len, report.availability))
    backends = [
        f"{name.ljust(width)}  "
        + ("ran" if name in ran else "available, not requested" if ok else f"unavailable: {why}")
        for name, (ok, why) in report.availability.items()
    ]
    lines = [
        f"recap_kernels {env['recap_kernels']} bench: the optimizer step of the recap workload",
        f"  machine    {env['device_name']} ({env['device']}), {env['threads']} threads",
        f"  software   {software}",
        f"  workload   {w.name}: {model}",
    ]
    if size_note:
        lines.append(f"             {size_note}")
    lines += [
        f"  step       {step}",
        f"  timing     {timing}",
        f"  bandwidth  {report.bandwidth_gbps:.1f} GB/s, measured in this run (a += s*b*c in place over 768 MiB)",
        f"  backends   {backends[0]}",
        *(f"             {line}" for line in backends[1:]),
    ]

    header = ("contender", "p50 ms", "p20 ms", "p80 ms", "host ms", "Mparam/s", "GB/s", "% bw", "time/torch",
              "check")
    table = [header] + [
        (
            row["contender"],
            f"{row['p50']:.3f}",
            f"{row['p20']:.3f}",
            f"{row['p80']:.3f}",
            f"{row['host_ms']:.3f}",
            f"{row['params_per_s'] / 1e6:.0f}",
            f"{row['gbps']:.1f}",
            f"{100 * row['frac_of_roofline']:.0f}",
            f"{row['time_vs_torch']:.2f}",
            row["check"] + (" (reference)" if row["contender"] == REFERENCE else "")
            + (f" (ran {'+'.join(row['backends_used'])})" if len(row["backends_used"]) > 1 else ""),
        )
        for row in rows(report)
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    text_columns = (0, len(header) - 1)  # left-aligned; numbers are right-aligned
    lines.append("")
    for r in table:
        cells = [
            c.ljust(wd) if i in text_columns else c.rjust(wd) for i, (c, wd) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.append(
        "(time/torch: p50 over the torch backend's p50, below 1 is faster; % bw: GB/s over the bandwidth above; "
        "host ms: p50 of the host's time in the step, on CUDA the time to enqueue it)"
    )
    for r in report.results:
        lines += [f"MISMATCH {r.contender.name}: {problem}" for problem in r.problems]
    return "\n".join(lines)
