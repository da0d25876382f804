"""Optimizer configs in the shape of a recap training config's ``optimizer`` block.

The models mirror the public recap configs (``optimizers/config.py`` and
``projects/home/recap/optimizer/config.py`` of twitter/the-algorithm-ml), so an existing recap YAML
file loads unchanged::

    optimizer:
      adam: {beta_1: 0.95, beta_2: 0.999, epsilon: 1.0e-07}
      multi_task_learning_rates:
        backbone_learning_rate:
          linear_ramp_to_constant: {learning_rate: 0.0001, num_ramp_steps: 1000}
        tower_learning_rates:
          task.a: {constant: 0.001}
      single_task_learning_rate: null

Conventions shared by every model here:

* a key set to ``null`` counts as unset (recap files spell out every unused alternative as ``null``);
* unknown keys are rejected, so a misspelt option fails loudly instead of silently taking a default;
* "exactly one of" groups fail validation with a message that names every field of the group.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, model_validator

__all__ = [
    "AdagradConfig",
    "EmbeddingOptimizerConfig",
    "LearningRate",
    "LinearRampToConstant",
    "LinearRampToCosine",
    "MultiTaskLearningRates",
    "PiecewiseConstant",
    "RecapAdamConfig",
    "RecapOptimizerConfig",
    "SgdConfig",
    "load_embedding_optimizer_config",
    "load_optimizer_config",
]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return {key: value for key, value in data.items() if value is not None}
        return data

    def _exactly_one_of(self, *fields: str) -> str:
        """The one field of ``fields`` that is set; raises naming all of them otherwise."""
        chosen = [name for name in fields if getattr(self, name) is not None]
        if len(chosen) != 1:
            got = ", ".join(chosen) if chosen else "none"
            raise ValueError(f"{type(self).__name__} needs exactly one of {', '.join(fields)}; got {got}")
        return chosen[0]


# -- learning-rate schedules ------------------------------------------------------------------------


class PiecewiseConstant(_Config):
    """``learning_rate_values[i]`` from step ``learning_rate_boundaries[i - 1]`` on (boundaries increasing)."""

    learning_rate_boundaries: list[NonNegativeInt]
    learning_rate_values: list[NonNegativeFloat]

    @model_validator(mode="after")
    def _check_shape(self) -> PiecewiseConstant:
        boundaries, values = self.learning_rate_boundaries, self.learning_rate_values
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                f"learning_rate_values needs one more entry than learning_rate_boundaries; "
                f"got {len(values)} values for {len(boundaries)} boundaries"
            )
        if any(a >= b for a, b in pairwise(boundaries)):
            raise ValueError(f"learning_rate_boundaries must be strictly increasing; got {boundaries}")
        return self


class LinearRampToConstant(_Config):
    """Ramp linearly from 0 to ``learning_rate`` over ``num_ramp_steps`` steps, then hold it."""

    learning_rate: NonNegativeFloat
    num_ramp_steps: NonNegativeInt


class LinearRampToCosine(_Config):
    """Ramp linearly from 0 to ``learning_rate``, then cosine-decay to ``final_learning_rate``.

    The ramp lasts ``num_ramp_steps`` steps; the decay ends at step ``final_num_steps``, after which
    the rate stays at ``final_learning_rate``.
    """

    learning_rate: NonNegativeFloat
    final_learning_rate: NonNegativeFloat
    num_ramp_steps: NonNegativeInt
    final_num_steps: NonNegativeInt

    @model_validator(mode="after")
    def _check_steps(self) -> LinearRampToCosine:
        if self.final_num_steps <= self.num_ramp_steps:
            raise ValueError(
                f"final_num_steps ({self.final_num_steps}) must be greater than num_ramp_steps ({self.num_ramp_steps})"
            )
        return self


class LearningRate(_Config):
    """A learning-rate schedule: exactly one of the four kinds. See :func:`recap_kernels.compute_lr`."""

    constant: NonNegativeFloat | None = None
    piecewise_constant: PiecewiseConstant | None = None
    linear_ramp_to_constant: LinearRampToConstant | None = None
    linear_ramp_to_cosine: LinearRampToCosine | None = None

    @model_validator(mode="after")
    def _one_schedule(self) -> LearningRate:
        self._exactly_one_of("constant", "piecewise_constant", "linear_ramp_to_constant", "linear_ramp_to_cosine")
        return self


# -- the dense (Adam) optimizer ---------------------------------------------------------------------


class RecapAdamConfig(_Config):
    """Adam's hyperparameters; the learning rate comes from the schedules."""

    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.999, ge=0, lt=1)
    epsilon: NonNegativeFloat = 1e-7


class MultiTaskLearningRates(_Config):
    """One schedule per task tower (in this order) and one for the shared backbone."""

    tower_learning_rates: dict[str, LearningRate]
    backbone_learning_rate: LearningRate | None = None


class RecapOptimizerConfig(_Config):
    """The ``optimizer`` block of a recap training config: Adam plus per-task or single-task schedules."""

    adam: RecapAdamConfig = Field(default_factory=RecapAdamConfig)
    multi_task_learning_rates: MultiTaskLearningRates | None = None
    single_task_learning_rate: LearningRate | None = None

    @model_validator(mode="after")
    def _one_kind_of_schedule(self) -> RecapOptimizerConfig:
        self._exactly_one_of("multi_task_learning_rates", "single_task_learning_rate")
        return self


# -- the embedding-table optimizer ------------------------------------------------------------------


class AdagradConfig(_Config):
    """Adagrad for the embedding tables (``torch.optim.Adagrad``'s arguments; lr comes from the schedule).

    ``mode`` says how the tables are trained: ``"dense"`` or ``"sparse"`` gradients (the same
    optimizer handles both; sparse gradients cannot take weight decay), or ``"rowwise"`` Adagrad,
    one accumulator per embedding row.
    """

    mode: Literal["dense", "sparse", "rowwise"] = "dense"
    eps: NonNegativeFloat = 1e-10
    initial_accumulator_value: NonNegativeFloat = 0.0
    lr_decay: NonNegativeFloat = 0.0
    weight_decay: NonNegativeFloat = 0.0

    @model_validator(mode="after")
    def _sparse_without_decay(self) -> AdagradConfig:
        if self.mode == "sparse" and self.weight_decay != 0:
            raise ValueError("weight_decay must be 0 with mode 'sparse': Adagrad cannot decay with sparse gradients")
        return self


class SgdConfig(_Config):
    """SGD for the embedding tables (``torch.optim.SGD``'s arguments; lr comes from the schedule)."""

    momentum: NonNegativeFloat = 0.0
    weight_decay: NonNegativeFloat = 0.0


class EmbeddingOptimizerConfig(_Config):
    """The optimizer of the embedding tables: a schedule plus exactly one of ``adagrad`` / ``sgd``."""

    learning_rate: LearningRate
    adagrad: AdagradConfig | None = None
    sgd: SgdConfig | None = None

    @model_validator(mode="after")
    def _one_optimizer(self) -> EmbeddingOptimizerConfig:
        self._exactly_one_of("adagrad", "sgd")
        return self


# -- loading ----------------------------------------------------------------------------------------

_ConfigT = TypeVar("_ConfigT", bound=_Config)


def load_optimizer_config(source: RecapOptimizerConfig | Mapping | str | os.PathLike) -> RecapOptimizerConfig:
    """Load a :class:`RecapOptimizerConfig`.

    Args:
        source: a path to a YAML file (a ``str`` ending in ``.yaml`` / ``.yml``, or any
            ``os.PathLike``), YAML text, a mapping, or a config (returned as is). The document is
            either a whole training config, whose ``optimizer`` key is read and other keys ignored,
            or the optimizer block alone.
    """
    return _load(source, RecapOptimizerConfig, "optimizer")


def load_embedding_optimizer_config(
    source: EmbeddingOptimizerConfig | Mapping | str | os.PathLike,
) -> EmbeddingOptimizerConfig:
    """Load an :class:`EmbeddingOptimizerConfig`, like :func:`load_optimizer_config`.

    A whole training config keeps this block under its ``embedding_optimizer`` key.
    """
    return _load(source, EmbeddingOptimizerConfig, "embedding_optimizer")


def _load(source: Any, model: type[_ConfigT], key: str) -> _ConfigT:
    if isinstance(source, model):
        return source
    if isinstance(source, os.PathLike) or (
        isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))
    ):
        source = Path(source).read_text()
    data = yaml.safe_load(source) if isinstance(source, str) else source
    if not isinstance(data, Mapping):
        raise TypeError(f"expected a mapping for {model.__name__} (or {key!r} in one); got {type(data).__name__}")
    # The block alone never has this key (extra keys are forbidden), so its presence means a whole config.
    if key in data:
        data = data[key]
    return model.model_validate(data)
