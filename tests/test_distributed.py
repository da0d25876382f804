"""recap_kernels' optimizers under torch.distributed with real process groups: two ranks on gloo (CPU),
spawned per test, each training its part and comparing with torch.optim on the same run.

DDP averages gradients before the step, so every rank must end with torch.optim's parameters and
state; ZeroRedundancyOptimizer shards the parameters over the ranks and passes ``backend=`` through
to the optimizer it builds for each shard, and ``consolidate_state_dict`` gathers a state dict
torch.optim loads. DTensor parameters (FSDP2's shards) are stepped by the kernel backends on their local shards, state kept as
DTensors (Note [Sharded parameters] in recap_kernels/backends/_base.py): parameters and full state match
torch.optim's, distributed checkpoints move between the two, and ShardedGradScaler skips inf steps.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

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


def _batches(rank: int, out_features: int = 3):
    """Each rank's batches, drawn on the CPU and moved to the default device (CUDA in the GPU test)."""
    gen = torch.Generator().manual_seed(100 + rank)
    device = torch.get_default_device()
    return [(torch.randn(16, 13, generator=gen, device="cpu").to(device),
             torch.randn(16, out_features, generator=gen, device="cpu").to(device)) for _ in range(STEPS)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _fsdp2_model(seed: int) -> torch.nn.Module:
    """FSDP2 as its docs apply it: every Linear sharded, then the root. The last layer has one output, so
    its bias (one element) leaves rank 1 an empty shard."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(13, 32), torch.nn.ReLU(), torch.nn.Linear(32, 7), torch.nn.ReLU(),
                                torch.nn.Linear(7, 1))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _full_state(model, opt) -> tuple[list[Tensor], dict]:
    """Parameters and optimizer state gathered whole on every rank (keyed by parameter name)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    return [p.full_tensor().detach().clone() for p in model.parameters()], state


def _fsdp2(rank: int, backend: str, out: str) -> dict:
    """Ours and torch.optim train the same FSDP2 model; both return full parameters and state."""
    results = {}
    for name, cls, kwargs in (("ours", optim.AdamW, {"backend": backend}), ("torch", torch.optim.AdamW, {})):
        model = _fsdp2_model(0)
        opt = cls(model.parameters(), lr=0.01, weight_decay=0.1, **kwargs)
        _train(model, opt, _batches(rank, out_features=1))
        results[name] = (*_full_state(model, opt), sorted(getattr(opt, "backends_used", set)()))
    return results


def _fsdp2_checkpoint(rank: int, backend: str, out: str) -> dict:
    """torch.distributed.checkpoint across optimizers: each saves after half the steps, the other loads and
    finishes; sharded (dcp.save / dcp.load) and full (get/set_optimizer_state_dict) state dicts."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        get_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )

    makers = {"ours": lambda params: optim.AdamW(params, lr=0.01, weight_decay=0.1, backend=backend),
              "torch": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)}
    batches = _batches(rank, out_features=1)
    half = len(batches) // 2
    results = {}
    model = _fsdp2_model(0)
    opt = makers["torch"](model.parameters())
    _train(model, opt, batches)
    results["uninterrupted"] = _full_state(model, opt)
    for first, second in (("ours", "torch"), ("torch", "ours")):
        model = _fsdp2_model(0)
        opt = makers[first](model.parameters())
        _train(model, opt, batches[:half])
        model_state, optim_state = get_state_dict(model, opt)
        path = os.path.join(out, f"{first}-checkpoint")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
        full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))

        model = _fsdp2_model(1)  # other weights: everything must come from the checkpoint
        opt = makers[second](model.parameters())
        model_state, optim_state = get_state_dict(model, opt)
        checkpoint = {"model": model_state, "optim": optim_state}
        dcp.load(checkpoint, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=checkpoint["model"], optim_state_dict=checkpoint["optim"])
        _train(model, opt, batches[half:])
        results[f"{first} then {second}"] = _full_state(model, opt)

        # the full state dict of the first optimizer, loaded into a second one on the same weights (without
        # gradients: set_optimizer_state_dict creates the new optimizer's state by a step with zero ones)
        model.zero_grad(set_to_none=True)
        again = makers[second](model.parameters())
        set_optimizer_state_dict(model, again, full, options=StateDictOptions(full_state_dict=True))
        results[f"{first} full into {second}"] = (full, get_optimizer_state_dict(
            model, again, options=StateDictOptions(full_state_dict=True)))
    return results


def _fsdp2_amp(rank: int, backend: str, out: str) -> dict:
    """ShardedGradScaler, with an overflow in rank 0's shard only at the first step: every rank skips that
    step and backs off the scale, as with torch.optim (ours takes found_inf without unscaling first)."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    results = {}
    for name, cls, kwargs in (("ours", optim.AdamW, {"backend": backend}), ("torch", torch.optim.AdamW, {})):
        model = _fsdp2_model(0)
        opt = cls(model.parameters(), lr=0.01, weight_decay=0.1, **kwargs)
        scaler = ShardedGradScaler("cpu", init_scale=2.0**16)
        scales = []
        for i, (x, y) in enumerate(_batches(rank, out_features=1)):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if i == 0 and rank == 0:
                next(model.parameters()).grad.to_local()[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        results[name] = (*_full_state(model, opt), scales)
    return results


class _TableModel(torch.nn.Sequential):
    def __init__(self):
        super().__init__(torch.nn.EmbeddingBag(37, 8, mode="sum"), torch.nn.Linear(8, 1))

    def forward(self, ids, offsets):
        return self[1](self[0](ids, offsets))


def _fsdp2_rowwise(rank: int, backend: str, out: str) -> dict:
    """RowWiseAdagrad on an embedding table that FSDP2 shards by rows (37 rows: uneven shards), against the
    torch backend's row-wise step on the DTensors themselves."""
    from torch.distributed.fsdp import fully_shard

    results = {}
    for name, chosen in (("ours", backend), ("torch", "torch")):
        torch.manual_seed(0)
        model = _TableModel()
        fully_shard(model[0])
        fully_shard(model)
        table = model[0].weight
        opts = [optim.RowWiseAdagrad([table], lr=0.1, weight_decay=0.01, initial_accumulator_value=0.1,
                                     backend=chosen),
                torch.optim.SGD(model[1].parameters(), lr=0.1)]
        gen = torch.Generator().manual_seed(100 + rank)
        for _ in range(STEPS):
            for opt in opts:
                opt.zero_grad()
            ids = torch.randint(0, 37, (24,), generator=gen)
            model(ids, torch.arange(0, 24, 3)).square().mean().backward()
            for opt in opts:
                opt.step()
        results[name] = (*_full_state(model, opts[0]), sorted(opts[0].backends_used()))
    return results


def _fsdp2_refused(rank: int, backend: str, out: str) -> dict:
    """A kernel backend named outright says why it cannot step a DTensor it cannot unwrap (here: the state
    of a parameter replaced by a plain tensor, so it is not sharded as its parameter)."""
    model = _fsdp2_model(0)
    opt = optim.AdamW(model.parameters(), backend=backend)
    _train(model, opt, _batches(rank, out_features=1)[:1])
    p = next(iter(model.parameters()))
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].full_tensor()
    try:
        _train(model, opt, _batches(rank, out_features=1)[:1])
        return {"refused": ""}
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return {"refused": f"{type(exc).__name__}: {exc}"}


def _ddp_or_zero(rank: int, kind: str, backend: str) -> dict:
    results = {}
    for name, cls, kwargs in (("ours", optim.AdamW, {"backend": backend}), ("torch", torch.optim.AdamW, {})):
        model = _model(0)
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
    return results


_FSDP2_KINDS = {"fsdp2": _fsdp2, "fsdp2-checkpoint": _fsdp2_checkpoint, "fsdp2-amp": _fsdp2_amp,
                "fsdp2-rowwise": _fsdp2_rowwise, "fsdp2-refused": _fsdp2_refused}


def _worker(rank: int, port: int, kind: str, backend: str, out: str, world: int, device: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.set_default_device(device)
        if kind in _FSDP2_KINDS:
            results = _FSDP2_KINDS[kind](rank, backend, out)
        else:
            results = _ddp_or_zero(rank, kind, backend)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def _run(kind: str, backend: str, world: int = WORLD, device: str = "cpu") -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(_free_port(), kind, backend, out, world, device), nprocs=world, join=True,
                           start_method="spawn")
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False, map_location="cpu")
                for r in range(world)]


def _plain(value):
    return tuple(value) if isinstance(value, list) else value


def _assert_state_close(ours: dict, ref: dict) -> None:
    for mine, theirs in zip(ours["param_groups"], ref["param_groups"], strict=True):
        # torch's keys and values (ours may add its own); a checkpoint's round trip turns betas into a list
        assert {k: _plain(mine[k]) for k in theirs} == {k: _plain(v) for k, v in theirs.items()}
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


def _assert_full_state_close(ours: tuple, ref: tuple) -> None:
    for p, q in zip(ours[0], ref[0], strict=True):
        torch.testing.assert_close(p, q)
    _assert_state_close(ours[1], ref[1])


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_fsdp2_steps_local_shards_as_torch_optim_steps_dtensors(backend):
    for result in _run("fsdp2", backend):
        ours, ref = result["ours"], result["torch"]
        _assert_full_state_close(ours[:2], ref[:2])
        # the kernel backends step the shards themselves (the torch backend, DTensors through torch's ops)
        assert ours[2] == ["cpu" if backend == "auto" else backend]
        for state in ours[1]["state"].values():
            assert state["step"].dtype == torch.float32 and state["step"].dim() == 0


@pytest.mark.parametrize("backend", [b if b != "triton" else pytest.param(b, marks=pytest.mark.slow)
                                     for b in BACKENDS[1:]])
def test_fsdp2_distributed_checkpoints_move_between_ours_and_torch_optim(backend):
    for result in _run("fsdp2-checkpoint", backend):
        reference = result["uninterrupted"]
        for name in ("ours then torch", "torch then ours"):
            _assert_full_state_close(result[name], reference)
        for name in ("ours full into torch", "torch full into ours"):
            saved, loaded = result[name]
            _assert_state_close(loaded, saved)
            for fqn, state in loaded["state"].items():  # loaded as saved, bit for bit
                assert all(torch.equal(v, saved["state"][fqn][k]) for k, v in state.items())


def test_fsdp2_sharded_grad_scaler_skips_inf_steps_as_torch_optim_does():
    for result in _run("fsdp2-amp", BACKENDS[1] if len(BACKENDS) > 1 else "torch"):
        ours, ref = result["ours"], result["torch"]
        assert ours[2] == ref[2] and ours[2][0] == 2.0**15  # skipped on both ranks, backed off the same way
        _assert_full_state_close(ours[:2], ref[:2])


@pytest.mark.skipif(len(BACKENDS) < 2, reason="no kernel backend runs here")
def test_fsdp2_rowwise_adagrad_steps_row_shards_of_a_table():
    for result in _run("fsdp2-rowwise", BACKENDS[1]):
        ours, ref = result["ours"], result["torch"]
        _assert_full_state_close(ours[:2], ref[:2])
        assert ours[2] == [BACKENDS[1]] and ref[2] == ["torch"]
        (state,) = ours[1]["state"].values()
        assert state["sum"].shape == (37, 1)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="no kernel backend runs here")
def test_fsdp2_kernel_backend_says_why_it_cannot_step_a_dtensor():
    for result in _run("fsdp2-refused", BACKENDS[1]):
        assert result["refused"].startswith("BackendUnavailableError") and "DTensors" in result["refused"]


@pytest.mark.gpu
@pytest.mark.skipif(not dist.is_nccl_available(), reason="torch.distributed without NCCL")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fsdp2_on_one_gpu_with_nccl_steps_shards_as_torch_optim(backend):
    (result,) = _run("fsdp2", backend, world=1, device="cuda")
    ours, ref = result["ours"], result["torch"]
    _assert_full_state_close(ours[:2], ref[:2])
    assert ours[2] == [backend]


# What a rank prints when it aborts in torch's teardown at interpreter exit, after its work is done. A core
# dump of one (torch 2.14.1, gloo) shows the race: a ProcessGroupGloo worker thread (runLoop) drops the
# final barrier's work, which holds the last backward's allreduce work, whose captured ThreadLocalState
# holds a Python object (a SafePyObject: most likely the contextvars autograd stashes in thread-local
# storage during backward); its decref takes the GIL while the main thread is in Py_FinalizeEx, so
# CPython ends the thread (pthread_exit) inside a noexcept destructor: std::terminate (pytorch/pytorch
# PR 179291 describes it; its atexit fix was abandoned). The README's script with torch.optim.AdamW in
# place of ours aborts the same way: 3 runs in 70 against ours 5 in 70, run in turn on the 2-core EPYC
# under load; ours alone 0 in 57.
_TEARDOWN_ABORT = "terminate called without an active exception"


def test_the_readmes_fsdp2_example_runs_with_torchrun(tmp_path):
    """The README's FSDP2 + optim.AdamW script, run as it says (torchrun, two ranks). A run that fails only
    by torch's abort at exit (_TEARDOWN_ABORT), its output complete, is run once more: a script that fails
    twice, or fails otherwise, fails the test."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (script,) = re.findall(r"```python\n(# fsdp2_adamw\.py.*?)```", readme, flags=re.S)
    path = tmp_path / "fsdp2_adamw.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(path)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if run.returncode != 0 and _TEARDOWN_ABORT in run.stderr and "backends: [" in run.stdout:
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = "cpu" if len(BACKENDS) > 1 and BACKENDS[1] == "cpu" else "torch"
    assert f"backends: ['{expected}']" in run.stdout
