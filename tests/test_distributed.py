"""recap_kernels' optimizers under torch.distributed with real process groups: two ranks on gloo (CPU),
spawned per test, each training its part and comparing with torch.optim on the same run.

DDP averages gradients before the step, so every rank must end with torch.optim's parameters and
state; ZeroRedundancyOptimizer shards the parameters over the ranks and passes ``backend=`` through
to the optimizer it builds for each shard, and ``consolidate_state_dict`` gathers a state dict
torch.optim loads. FSDP2 (DTensor shards) trains under ``backend="auto"`` through the torch backend; the
kernel backends refuse DTensors with a clear error (they do not take them yet).
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recap_kernels import optim
from recap_kernels.backends import get_backend

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
STEPS = 4
CPU = torch.device("cpu")
# Every backend that runs CPU tensors here (triton through its interpreter: tests/conftest.py sets it, and the
# spawned ranks inherit the environment).
BACKENDS = ["torch", *(b for b in ("cpu", "triton") if get_backend(b).available(CPU).ok)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 32), torch.nn.ReLU(), torch.nn.Linear(32, 7),
                               torch.nn.ReLU(), torch.nn.Linear(7, 3))


def _batches(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(16, 13, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(STEPS)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _worker(rank: int, port: int, kind: str, backend: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        results = {}
        contenders = (("ours", optim.AdamW, {"backend": backend}), ("torch", torch.optim.AdamW, {}))
        for name, cls, kwargs in () if kind == "fsdp2-refused" else contenders:
            model = _model(0)
            if kind == "fsdp2":  # every Linear sharded, then the root; the optimizer sees DTensor shards
                from torch.distributed.fsdp import fully_shard

                for layer in model:
                    if isinstance(layer, torch.nn.Linear):
                        fully_shard(layer)
                fully_shard(model)
                opt = cls(model.parameters(), lr=0.01, weight_decay=0.1, **kwargs)
                _train(model, opt, _batches(rank))
                results[name] = ([p.full_tensor().detach().clone() for p in model.parameters()],
                                 sorted(getattr(opt, "backends_used", set)()))
                continue
            if kind == "ddp":
                wrapped = torch.nn.parallel.DistributedDataParallel(model)
                opt = cls(wrapped.parameters(), lr=0.01, weight_decay=0.1, **kwargs)
                _train(wrapped, opt, _batches(rank))
                state = opt.state_dict()
            else:  # ZeroRedundancyOptimizer: each rank steps its shard, then broadcasts it
                from torch.distributed.optim import ZeroRedundancyOptimizer

                opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, lr=0.01, weight_decay=0.1,
                                              **kwargs)
                _train(model, opt, _batches(rank))
                opt.consolidate_state_dict(to=0)
                state = opt.state_dict() if rank == 0 else None
            results[name] = ([p.detach().clone() for p in model.parameters()], state)
        if kind == "fsdp2-refused":  # a kernel backend named outright says why it cannot
            try:
                model = _model(0)
                from torch.distributed.fsdp import fully_shard

                fully_shard(model)
                opt = optim.AdamW(model.parameters(), backend=backend)
                _train(model, opt, _batches(rank)[:1])
                results["refused"] = ""
            except Exception as exc:  # noqa: BLE001 - the message is what the test checks
                results["refused"] = f"{type(exc).__name__}: {exc}"
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def _run(kind: str, backend: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(_free_port(), kind, backend, out), nprocs=WORLD, join=True,
                           start_method="spawn")
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _assert_state_close(ours: dict, ref: dict) -> None:
    for mine, theirs in zip(ours["param_groups"], ref["param_groups"], strict=True):
        assert {k: mine[k] for k in theirs} == theirs  # torch's keys and values (ours may add its own)
    assert ours["state"].keys() == ref["state"].keys()
    for i, state in ours["state"].items():
        for key, value in ref["state"][i].items():
            torch.testing.assert_close(state[key].float(), value.float(), msg=lambda m: f"state[{i}][{key}]: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_trains_as_torch_optim_does_on_every_rank(backend):
    for ours, ref in ((r["ours"], r["torch"]) for r in _run("ddp", backend)):
        for p, q in zip(ours[0], ref[0]):
            torch.testing.assert_close(p, q)
        _assert_state_close(ours[1], ref[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_redundancy_optimizer_shards_and_consolidates_like_torch_optim(backend):
    ranks = _run("zero", backend)
    for result in ranks:
        for p, q in zip(result["ours"][0], result["torch"][0]):
            torch.testing.assert_close(p, q)
    # ranks agree after ZeRO's broadcast, and the consolidated state loads into torch.optim
    for p, q in zip(ranks[0]["ours"][0], ranks[1]["ours"][0]):
        assert torch.equal(p, q)
    ours, ref = ranks[0]["ours"][1], ranks[0]["torch"][1]
    _assert_state_close(ours, ref)
    model = _model(0)
    torch.optim.AdamW(model.parameters(), lr=0.01).load_state_dict(ours)


def test_fsdp2_trains_under_auto_and_kernel_backends_refuse_dtensors():
    ranks = _run("fsdp2", "auto")
    for result in ranks:
        for p, q in zip(result["ours"][0], result["torch"][0]):
            torch.testing.assert_close(p, q)
        assert result["ours"][1] == ["torch"]
    for backend in BACKENDS[1:2]:  # one kernel backend is enough for the message
        for result in _run("fsdp2-refused", backend):
            assert result["refused"].startswith("BackendUnavailableError") and "DTensors" in result["refused"]
