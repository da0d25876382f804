"""The recap workload: a heavy-ranker-shaped model, its synthetic batches and its optimizer configs.

Defined once, from ``recap_config.yaml`` beside this file, for ``python -m recap_kernels bench``
and the pytest-benchmark suites alike. The model has what makes a recap optimizer step hard:

* a shared backbone MLP of wide layers (1024 at full size), scheduled as ``backbone``;
* ten task towers of ``[256, 128, 1]``: sixty small tensors, ten param groups, ten learning-rate
  schedules, where per-tensor launch and dispatch overhead dominate;
* an ``nn.EmbeddingBag`` table under ``embedding_bags``, much larger than the dense part, stepped
  by Adagrad with sparse gradients (``embedding_gradients: sparse``: only the rows a batch names;
  :meth:`Workload.with_embedding_gradients` gives the dense-gradient variant, every row every step).

Every parameter and every batch derives from the config's seed: two builds of the same
:class:`Workload` start from the same numbers and see the same data, on any device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from recap_kernels.config import (
    EmbeddingOptimizerConfig,
    UniqueKeyLoader,
    RecapOptimizerConfig,
    load_embedding_optimizer_config,
    load_optimizer_config,
)

CONFIG_PATH = Path(__file__).with_name("recap_config.yaml")

# --size presets, as scales of the config's shape. "default" is the config itself on a GPU and half
# of it on a CPU: a 512K-row table, whose step still streams 400 MiB (past a server CPU's L3), and
# a bench that finishes in well under a minute on two cores.
DEFAULT_SCALES = {"cuda": 1.0, "cpu": 0.5}
SMALL_SCALE = 1 / 16  # a run of a few steps takes seconds: for tests
_MIN_WIDTH = 8


@dataclass(frozen=True)
class Workload:
    """The model's shape and its data, as read from the config's ``model`` and ``train_data``."""

    tasks: tuple[str, ...]
    backbone_sizes: tuple[int, ...]
    tower_sizes: tuple[int, ...]
    embedding_bags: tuple[tuple[str, int, int], ...]  # (table, num_embeddings, embedding_dim)
    num_dense_features: int
    batch_size: int
    ids_per_bag: int
    num_batches: int
    seed: int
    scale: float = 1.0
    embedding_gradients: str = "sparse"  # "sparse" | "dense": nn.EmbeddingBag(sparse=...)

    @property
    def name(self) -> str:
        name = "recap" if self.scale == 1 else f"recap-x{self.scale:g}"
        return name if self.embedding_gradients == "sparse" else f"{name}-dense-tables"

    def with_embedding_gradients(self, kind: str) -> Workload:
        """The same model whose tables get ``"sparse"`` or ``"dense"`` gradients."""
        if kind not in ("sparse", "dense"):
            raise ValueError(f"embedding_gradients must be 'sparse' or 'dense'; got {kind!r}")
        return dataclasses.replace(self, embedding_gradients=kind)

    def scaled(self, scale: float) -> Workload:
        """The backbone's widths and the tables' rows times ``scale``; towers and batches unchanged.

        The towers keep their recap shape at every scale: their many small tensors are the case a
        fused step exists for.
        """
        if not 0 < scale < float("inf"):
            raise ValueError(f"a workload scale must be positive and finite; got {scale}")
        return dataclasses.replace(
            self,
            backbone_sizes=tuple(max(_MIN_WIDTH, round(w * scale)) for w in self.backbone_sizes),
            embedding_bags=tuple((t, max(_MIN_WIDTH, round(n * scale)), d) for t, n, d in self.embedding_bags),
            scale=self.scale * scale,
        )


def load_workload(path: str | Path = CONFIG_PATH) -> Workload:
    """The full-size workload of a training config (by default the bundled ``recap_config.yaml``)."""
    doc = _read(path)
    model, data = doc["model"], doc["train_data"]
    towers = {tuple(spec["layer_sizes"]) for spec in model["tasks"].values()}
    if len(towers) != 1:
        raise ValueError(f"the workload expects every task tower to have one shape; got {sorted(towers)}")
    return Workload(
        tasks=tuple(model["tasks"]),
        backbone_sizes=tuple(model["backbone"]["layer_sizes"]),
        tower_sizes=towers.pop(),
        embedding_bags=tuple(
            (table, spec["num_embeddings"], spec["embedding_dim"]) for table, spec in model["embedding_bags"].items()
        ),
        num_dense_features=model["num_dense_features"],
        batch_size=data["global_batch_size"],
        ids_per_bag=data["ids_per_bag"],
        num_batches=data["num_batches"],
        seed=data["seed"],
    ).with_embedding_gradients(model.get("embedding_gradients", "sparse"))


def workload_for_size(size: str, device: torch.device, path: str | Path = CONFIG_PATH) -> Workload:
    """``size`` is ``"small"``, ``"default"`` (smaller on CPU than on CUDA) or a scale such as ``"0.5"``."""
    if size == "default":
        scale = DEFAULT_SCALES.get(device.type, DEFAULT_SCALES["cpu"])
    elif size == "small":
        scale = SMALL_SCALE
    else:
        try:
            scale = float(size)
        except ValueError:
            raise ValueError(f"size must be small, default or a positive number; got {size!r}") from None
    return load_workload(path).scaled(scale)


def load_optimizer_configs(path: str | Path = CONFIG_PATH) -> tuple[RecapOptimizerConfig, EmbeddingOptimizerConfig]:
    """The ``optimizer`` and ``embedding_optimizer`` blocks, through :mod:`recap_kernels.config`."""
    doc = _read(path)
    return load_optimizer_config(doc), load_embedding_optimizer_config(doc)


def _read(path: str | Path) -> dict[str, Any]:
    return yaml.load(Path(path).read_text(), Loader=UniqueKeyLoader)  # a repeated key is an error


def _mlp(sizes: list[int], *, logits: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1] if logits else layers)


class RecapModel(nn.Module):
    """Embedding bags summed, concatenated with the dense features, a backbone, one tower per task.

    Parameter names put each tower under ``towers.<task with "." as "__">.``, the embedding tables
    under ``embedding_bags.``, and everything else under ``backbone.``, as the builder expects.
    """

    def __init__(self, workload: Workload):
        super().__init__()
        dims = {d for _, _, d in workload.embedding_bags}
        if len(dims) != 1:
            raise ValueError(f"the embedding bags are summed, so they need one embedding_dim; got {sorted(dims)}")
        dim = dims.pop()
        sparse = workload.embedding_gradients == "sparse"
        self.embedding_bags = nn.ModuleDict(
            {table: nn.EmbeddingBag(rows, dim, mode="sum", sparse=sparse) for table, rows, _ in workload.embedding_bags}
        )
        self.backbone = _mlp([workload.num_dense_features + dim, *workload.backbone_sizes], logits=False)
        width = workload.backbone_sizes[-1]
        self.towers = nn.ModuleDict(
            {task.replace(".", "__"): _mlp([width, *workload.tower_sizes], logits=True) for task in workload.tasks}
        )

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """The mean binary cross-entropy of every task's logit against its label."""
        pooled = sum(bag(batch[f"ids.{table}"]) for table, bag in self.embedding_bags.items())
        hidden = self.backbone(torch.cat([batch["dense"], pooled], dim=1))
        logits = torch.cat([tower(hidden) for tower in self.towers.values()], dim=1)
        return F.binary_cross_entropy_with_logits(logits, batch["labels"])


def build_model(workload: Workload, device: torch.device | str) -> RecapModel:
    """The model, initialized from the workload's seed (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(workload.seed)
        model = RecapModel(workload)  # initialized on the CPU, so every device starts from the same numbers
    return model.to(device)


def make_batches(workload: Workload, device: torch.device | str) -> list[dict[str, Tensor]]:
    """``workload.num_batches`` synthetic batches: dense features, bag ids per table, 0/1 labels per task."""
    gen = torch.Generator().manual_seed(workload.seed + 1)
    n = workload.batch_size
    batches = []
    for _ in range(workload.num_batches):
        batch = {
            "dense": torch.randn(n, workload.num_dense_features, generator=gen),
            "labels": torch.randint(0, 2, (n, len(workload.tasks)), generator=gen).float(),
        }
        for table, rows, _ in workload.embedding_bags:
            batch[f"ids.{table}"] = torch.randint(0, rows, (n, workload.ids_per_bag), generator=gen)
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches
