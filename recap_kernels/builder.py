"""Build a recap model's optimizer and learning-rate scheduler from its configs.

:func:`build_optimizer` reproduces recap's parameter grouping:

* **multi-task**: for each tower of ``tower_learning_rates``, in config order, the parameters whose
  name contains ``"." + task.replace(".", "__") + "."`` (the sanitised task name, as a module-path
  component) form the tower's group; every other parameter belongs to ``"backbone"``, except those
  whose name contains ``"embedding_bags"``, which form ``"embeddings"``;
* **single-task**: one group, ``"single_task"``, of every parameter; with an embedding optimizer
  config the ``embedding_bags`` parameters still go to ``"embeddings"``, so that config is obeyed
  rather than ignored.

Dense groups share one :class:`recap_kernels.optim.Adam`; the embedding group gets Adagrad (dense or
sparse gradients), :class:`recap_kernels.optim.RowWiseAdagrad` or SGD.
Each group carries its name under ``"name"`` and follows its own schedule through one
:class:`~recap_kernels.schedules.RecapLRScheduler`. Anything that would leave a group without a
schedule, or a schedule without a group, is a ``ValueError`` naming both sides.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from recap_kernels import optim
from recap_kernels.config import (
    EmbeddingOptimizerConfig,
    LearningRate,
    RecapOptimizerConfig,
    load_embedding_optimizer_config,
    load_optimizer_config,
)
from recap_kernels.schedules import RecapLRScheduler

__all__ = ["CombinedOptimizer", "build_optimizer"]

log = logging.getLogger(__name__)

BACKBONE = "backbone"
EMBEDDINGS = "embeddings"
SINGLE_TASK = "single_task"
EMBEDDING_MARKER = "embedding_bags"

# The lr a group has until the scheduler sets it. Every group is scheduled, so this is never used
# for a step; should that ever break, a rate this large makes the model diverge at once instead of
# training quietly at some default.
_UNSCHEDULED_LR = 1e10


def build_optimizer(
    model: nn.Module,
    optimizer_config: RecapOptimizerConfig | Mapping | str | os.PathLike,
    emb_optimizer_config: EmbeddingOptimizerConfig | Mapping | str | os.PathLike | None = None,
    *,
    backend: str = "auto",
    embedding_backend: str | None = None,
) -> tuple[torch.optim.Optimizer, RecapLRScheduler]:
    """The optimizer and scheduler of a recap model.

    Args:
        model: the model; its ``named_parameters()`` are grouped as the module docstring says.
        optimizer_config: the dense optimizer: a :class:`RecapOptimizerConfig` or anything
            :func:`~recap_kernels.config.load_optimizer_config` accepts (a path to a YAML file, YAML
            text or a mapping).
        emb_optimizer_config: the embedding tables' optimizer: an :class:`EmbeddingOptimizerConfig`
            or anything :func:`~recap_kernels.config.load_embedding_optimizer_config` accepts.
        backend: the kernels of Adam and Adagrad (see :class:`recap_kernels.optim.Adam`); SGD is
            ``torch.optim.SGD`` whatever this says.
        embedding_backend: the embedding tables' kernels, when they should differ from ``backend``
            (say the CUDA kernels for the dense groups and ``"auto"`` for tables with sparse
            gradients, where this build has no CUDA table kernels); default: ``backend``.

    Returns:
        ``(optimizer, scheduler)``. The optimizer is the Adam optimizer itself or, when there is an
        embedding group, a :class:`CombinedOptimizer` whose ``param_groups`` list the dense groups
        (towers in config order, then the backbone) and then the embedding group. Call
        ``scheduler.step()`` once per training step, after ``optimizer.step()``.

    Raises:
        ValueError: a parameter matches two towers; a tower matches no parameter; a group has
            parameters but no schedule, or a schedule has no parameters.
        FileNotFoundError, TypeError, pydantic.ValidationError, yaml.YAMLError: a config does not
            load (see :func:`~recap_kernels.config.load_optimizer_config`), before any parameter is grouped.
    """
    config = load_optimizer_config(optimizer_config)
    emb_config = None if emb_optimizer_config is None else load_embedding_optimizer_config(emb_optimizer_config)

    dense_groups, dense_lrs, embedding_params = _group_parameters(model, config, emb_config)
    adam = config.adam
    optimizer = optim.Adam(
        dense_groups, lr=_UNSCHEDULED_LR, betas=(adam.beta_1, adam.beta_2), eps=adam.epsilon, backend=backend
    )
    lr_configs = dense_lrs
    if embedding_params:
        embedding = _embedding_optimizer({"params": embedding_params, "name": EMBEDDINGS}, emb_config,
                                         backend if embedding_backend is None else embedding_backend)
        optimizer = CombinedOptimizer(optimizer, embedding, param_names=dict(model.named_parameters()))
        lr_configs = [*dense_lrs, emb_config.learning_rate]
    return optimizer, RecapLRScheduler(optimizer, lr_configs)


def _group_parameters(
    model: nn.Module, config: RecapOptimizerConfig, emb_config: EmbeddingOptimizerConfig | None
) -> tuple[list[dict[str, Any]], list[LearningRate], list[Tensor]]:
    """Dense param groups with their schedules, and the embedding parameters, checked against the configs."""
    multi = config.multi_task_learning_rates
    towers = {} if multi is None else multi.tower_learning_rates
    keys = {task: f".{task.replace('.', '__')}." for task in towers}
    if multi is None:
        rest, rest_lr, rest_field = SINGLE_TASK, config.single_task_learning_rate, "single_task_learning_rate"
    else:
        rest, rest_lr, rest_field = BACKBONE, multi.backbone_learning_rate, "backbone_learning_rate"
    split_embeddings = multi is not None or emb_config is not None

    tower_members: dict[str, list[tuple[str, Tensor]]] = {task: [] for task in towers}
    rest_members: list[tuple[str, Tensor]] = []
    embedding_members: list[tuple[str, Tensor]] = []
    for name, param in model.named_parameters():
        matches = [task for task, key in keys.items() if key in name]
        if len(matches) > 1:
            raise ValueError(
                f"parameter {name!r} matches towers {matches[0]!r} and {matches[1]!r} (it contains both "
                f"{keys[matches[0]]!r} and {keys[matches[1]]!r}); each parameter must belong to one tower"
            )
        if matches:
            group, members = matches[0], tower_members[matches[0]]
        elif split_embeddings and EMBEDDING_MARKER in name:
            group, members = EMBEDDINGS, embedding_members
        else:
            group, members = rest, rest_members
        members.append((name, param))
        log.debug("optimizer group %s: %s", group, name)

    for task, key in keys.items():
        if not tower_members[task]:
            raise ValueError(f"tower {task!r} has a learning rate but no parameter name contains {key!r}")
    _check_pairing(rest, rest_members, rest_lr, rest_field)
    _check_pairing(EMBEDDINGS, embedding_members, emb_config, "emb_optimizer_config")

    named_groups = [(task, tower_members[task], lr) for task, lr in towers.items()]
    if rest_members:
        named_groups.append((rest, rest_members, rest_lr))
    dense_groups = [{"params": [p for _, p in members], "name": group} for group, members, _ in named_groups]
    dense_lrs = [lr for _, _, lr in named_groups]
    return dense_groups, dense_lrs, [p for _, p in embedding_members]


def _check_pairing(group: str, members: list[tuple[str, Tensor]], schedule: Any, field: str) -> None:
    """A group with parameters needs a schedule, and a schedule needs parameters."""
    if members and schedule is None:
        shown = ", ".join(repr(name) for name, _ in members[:3]) + (", ..." if len(members) > 3 else "")
        raise ValueError(f"{len(members)} parameters fall in group {group!r} ({shown}) but {field} is not set")
    if schedule is not None and not members:
        why = f"no parameter name contains {EMBEDDING_MARKER!r}" if group == EMBEDDINGS else "it has no parameters"
        raise ValueError(f"{field} is set but group {group!r} is empty: {why}")


def _embedding_optimizer(
    group: dict[str, Any], config: EmbeddingOptimizerConfig, backend: str
) -> torch.optim.Optimizer:
    if config.sgd is not None:
        return optim.SGD(
            [group], lr=_UNSCHEDULED_LR, momentum=config.sgd.momentum, weight_decay=config.sgd.weight_decay
        )
    adagrad = config.adagrad
    # "dense" and "sparse" are one optimizer (Adagrad follows whichever gradient layout arrives);
    # "rowwise" takes either kind of gradient too.
    cls = optim.RowWiseAdagrad if adagrad.mode == "rowwise" else optim.Adagrad
    return cls(
        [group],
        lr=_UNSCHEDULED_LR,
        lr_decay=adagrad.lr_decay,
        weight_decay=adagrad.weight_decay,
        initial_accumulator_value=adagrad.initial_accumulator_value,
        eps=adagrad.eps,
        backend=backend,
    )


class CombinedOptimizer(torch.optim.Optimizer):
    """The dense and the embedding optimizer stepped as one, so that one scheduler drives both.

    ``param_groups`` are the wrapped optimizers' own group dicts (dense first), so learning rates
    set here, by a scheduler or by hand, are the ones the wrapped optimizers use. ``state`` is a
    read-only merged view of theirs; ``state_dict()`` is ``{"dense": ..., "embedding": ...}``, each
    the wrapped optimizer's torch.optim state dict.

    It also answers to torchrec's ``CombinedOptimizer`` / ``KeyedOptimizer`` conventions, so that a
    training loop written for torchrec's optimizer takes this one: ``optimizers`` is
    ``[("dense", ...), ("embedding", ...)]``; ``params`` maps ``prepend_opt_key(name, opt_key)``
    (``"dense.towers.a.weight"``) to each parameter; :meth:`keyed_state_dict` is torchrec's state
    dict (state keyed by those names; param groups too after ``save_param_groups(True)``), and
    :meth:`load_state_dict` takes it as well as our own; :meth:`init_state` creates every state
    before a checkpoint is loaded into it. What differs from torchrec: ``state_dict()`` stays
    torch.optim's (keyed by position, what ``torch.save`` checkpoints and the schedulers expect);
    ``zero_grad()`` sets gradients to None by default, as torch.optim does; loading a keyed state dict
    replaces the state (torchrec copies into state that must already exist), so it also loads into
    an optimizer that has not stepped; ``init_state`` steps with lr 0 (torchrec's steps with the lr
    set), so it never moves a weight.

    Args:
        dense: the optimizer of the dense groups (the towers and the backbone).
        embedding: the optimizer of the embedding tables.
        param_names: the parameters by name (``dict(model.named_parameters())``, as
            :func:`build_optimizer` passes it), for the keyed names; without it a parameter is named by
            its position in its optimizer (``"dense.3"``).
    """

    def __init__(self, dense: torch.optim.Optimizer, embedding: torch.optim.Optimizer, *,
                 param_names: Mapping[str, Tensor] | None = None) -> None:
        # Not Optimizer.__init__: that would build a second state and register the groups again.
        # Only what the base class's hooks and profiling need is set up here.
        super().__setstate__({"defaults": {"_save_param_groups": False}})
        self.dense = dense
        self.embedding = embedding
        self._param_names = dict(param_names or {})

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.dense.param_groups + self.embedding.param_groups

    @property
    def state(self) -> Mapping[Tensor, dict[str, Any]]:
        return _MergedState(self.dense.state, self.embedding.state)

    def step(self, closure=None):
        """Evaluate ``closure`` (if given) once, then step the dense and the embedding optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.dense.step()
        self.embedding.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none)
        self.embedding.zero_grad(set_to_none)

    def backends_used(self) -> set[str]:
        """The backends that the last ``step()`` dispatched to, across both optimizers (asked of them, so
        that a compiled step, whose Python ran while tracing, reports what ran)."""
        return _backends_used(self.dense) | _backends_used(self.embedding)

    def state_dict(self) -> dict[str, Any]:
        return {"dense": self.dense.state_dict(), "embedding": self.embedding.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict`'s ``{"dense": ..., "embedding": ...}`` or :meth:`keyed_state_dict`'s
        torchrec format (``{"state": {name: ...}}``, param groups optional)."""
        if "state" in state_dict:
            self._load_keyed(state_dict)
            return
        if set(state_dict) != {"dense", "embedding"}:
            raise ValueError(
                f"CombinedOptimizer loads a state_dict with keys 'dense' and 'embedding' (or torchrec's keyed "
                f"'state'); got {sorted(state_dict)}"
            )
        self.dense.load_state_dict(state_dict["dense"])
        self.embedding.load_state_dict(state_dict["embedding"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise TypeError("add the group to CombinedOptimizer.dense or .embedding, which own the param groups")

    # -- torchrec's conventions -------------------------------------------------------------------
    @property
    def optimizers(self) -> list[tuple[str, torch.optim.Optimizer]]:
        """``(key, optimizer)`` pairs, as torchrec's ``CombinedOptimizer.optimizers``."""
        return [("dense", self.dense), ("embedding", self.embedding)]

    @staticmethod
    def prepend_opt_key(name: str, opt_key: str) -> str:
        """torchrec's key of parameter ``name`` in the optimizer keyed ``opt_key``."""
        if not name:
            return opt_key
        return opt_key + ("." if opt_key else "") + name

    def _keyed(self) -> list[tuple[str, torch.optim.Optimizer, list[tuple[str, Tensor]]]]:
        """Each optimizer with its parameters, in its own order, under their keyed names."""
        names = {id(p): name for name, p in self._param_names.items()}
        keyed = []
        for opt_key, opt in self.optimizers:
            params = [p for group in opt.param_groups for p in group["params"]]
            keyed.append((opt_key, opt, [(self.prepend_opt_key(names.get(id(p), str(i)), opt_key), p)
                                         for i, p in enumerate(params)]))
        return keyed

    @property
    def params(self) -> dict[str, Tensor]:
        """Every parameter under its keyed name (``"dense.towers.a.weight"``), as torchrec's ``params``."""
        return {name: p for _, _, named in self._keyed() for name, p in named}

    def save_param_groups(self, save: bool) -> None:
        """Whether :meth:`keyed_state_dict` includes the param groups (torchrec's default: no)."""
        self.defaults["_save_param_groups"] = bool(save)

    def keyed_state_dict(self) -> dict[str, Any]:
        """torchrec's ``KeyedOptimizer.state_dict()``: ``{"state": {name: state}}`` (and ``"param_groups"``,
        each with ``"params"`` as sorted names, after ``save_param_groups(True)``)."""
        state: dict[str, Any] = {}
        groups = []
        for _, opt, named in self._keyed():
            by_param = {id(p): name for name, p in named}
            for name, p in named:
                if p in opt.state:
                    state[name] = dict(opt.state[p])
            for group in opt.param_groups:
                groups.append({"params": sorted(by_param[id(p)] for p in group["params"]),
                               **{k: v for k, v in group.items() if k != "params"}})
        keyed: dict[str, Any] = {"state": state}
        if self.defaults["_save_param_groups"]:
            keyed["param_groups"] = groups
        return keyed

    def _load_keyed(self, keyed: Mapping[str, Any]) -> None:
        """Load a keyed state dict through each optimizer's own ``load_state_dict`` (which converts and
        checks it as for a torch.optim checkpoint): names to positions, groups matched by their names."""
        unknown = set(keyed["state"]) - set(self.params)
        if unknown:
            raise ValueError(f"a keyed state dict has state for parameters this optimizer does not hold: "
                             f"{sorted(unknown)[:5]}")
        saved_groups = {tuple(group["params"]): group for group in keyed.get("param_groups", ())}
        for _, opt, named in self._keyed():
            position = {id(p): i for i, (_, p) in enumerate(named)}
            name_of = {id(p): name for name, p in named}
            groups = []
            for group in opt.param_groups:
                saved = saved_groups.get(tuple(sorted(name_of[id(p)] for p in group["params"])), {})
                groups.append({**{k: v for k, v in group.items() if k != "params"},
                               **{k: v for k, v in saved.items() if k != "params"},
                               "params": [position[id(p)] for p in group["params"]]})
            state = {position[id(p)]: keyed["state"][name] for name, p in named if name in keyed["state"]}
            opt.load_state_dict({"state": state, "param_groups": groups})

    def init_state(self, sparse_grad_parameter_names: set[str] | None = None) -> None:
        """Create every parameter's state, as torchrec's ``init_state``, so that a checkpoint can be
        loaded into it: one step with zero gradients (sparse ones for the names given) and lr 0, which
        moves no weight; gradients are None afterwards. The step counters count that step, as torchrec's do."""
        sparse = sparse_grad_parameter_names or set()
        for name, p in self.params.items():
            if p.requires_grad:
                zeros = torch.zeros_like(p)
                p.grad = zeros.to_sparse() if name in sparse else zeros
        lrs = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = torch.zeros_like(group["lr"]) if torch.is_tensor(group["lr"]) else 0.0
        try:
            self.step()
        finally:
            for group, lr in zip(self.param_groups, lrs):
                group["lr"] = lr
            self.zero_grad(set_to_none=True)

    def __getstate__(self) -> dict[str, Any]:
        return {"dense": self.dense, "embedding": self.embedding, "param_names": self._param_names}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["dense"], state["embedding"], param_names=state.get("param_names"))


def _backends_used(optimizer: torch.optim.Optimizer) -> set[str]:
    # Stock torch.optim optimizers (SGD) run torch's own math.
    report = getattr(optimizer, "backends_used", None)
    return report() if report is not None else {"torch"}


class _MergedState(Mapping):
    """``state[p]`` of whichever wrapped optimizer owns ``p``, without creating entries on lookup."""

    def __init__(self, *states: Mapping[Tensor, dict[str, Any]]) -> None:
        self._states = states

    def __getitem__(self, param: Tensor) -> dict[str, Any]:
        for state in self._states:
            if param in state:
                return state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator[Tensor]:
        for state in self._states:
            yield from state

    def __len__(self) -> int:
        return sum(len(state) for state in self._states)
