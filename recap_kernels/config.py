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
* "exactly one of" groups fail validation with a message that names every field of the group;
* numbers are strict: a real field takes an int or a float but neither a boolean nor a string (YAML's
  ``true`` or ``"0.1"`` would otherwise pass as 1.0 / 0.1), and never inf or nan; a step count takes an
  int, or a float with no fractional part (``1.0e+3``: PyYAML reads ``1e3`` as a string);
* YAML is read by :class:`UniqueKeyLoader`, so a key given twice in one mapping is an error rather than
  a silent "last one wins".
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from itertools import pairwise
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "AdagradConfig",
    "DuplicateKeyError",
    "EmbeddingOptimizerConfig",
    "LearningRate",
    "LinearRampToConstant",
    "LinearRampToCosine",
    "MultiTaskLearningRates",
    "PiecewiseConstant",
    "RecapAdamConfig",
    "RecapOptimizerConfig",
    "SgdConfig",
    "UniqueKeyLoader",
    "load_embedding_optimizer_config",
    "load_optimizer_config",
]


def _whole_float_to_int(value: Any) -> Any:
    """``1000.0`` as ``1000``; a float with a fractional part is an error; anything else is left to strict int."""
    if isinstance(value, float):
        if not value.is_integer():
            raise PydanticCustomError(
                "int_from_float", "Input should be a valid integer, got a number with a fractional part"
            )
        return int(value)
    return value


# Strict: pydantic's lax mode would take YAML's `true` as 1.0 and the string "0.1" as 0.1. A strict float still
# takes an int (`constant: 1` is 1.0). inf and nan are never a meaningful rate, beta or epsilon.
_Real = Annotated[float, Strict(), AllowInfNan(False)]
_NonNegativeReal = Annotated[_Real, Field(ge=0)]
# A number of steps: an int (not a bool or string), or a whole float (1.0e+3), as an int.
_StepCount = Annotated[int, BeforeValidator(_whole_float_to_int), Strict(), Field(ge=0)]


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

    learning_rate_boundaries: list[_StepCount]
    learning_rate_values: list[_NonNegativeReal]

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

    learning_rate: _NonNegativeReal
    num_ramp_steps: _StepCount


class LinearRampToCosine(_Config):
    """Ramp linearly from 0 to ``learning_rate``, then cosine-decay to ``final_learning_rate``.

    The ramp lasts ``num_ramp_steps`` steps; the decay ends at step ``final_num_steps``, after which
    the rate stays at ``final_learning_rate``.
    """

    learning_rate: _NonNegativeReal
    final_learning_rate: _NonNegativeReal
    num_ramp_steps: _StepCount
    final_num_steps: _StepCount

    @model_validator(mode="after")
    def _check_steps(self) -> LinearRampToCosine:
        if self.final_num_steps <= self.num_ramp_steps:
            raise ValueError(
                f"final_num_steps ({self.final_num_steps}) must be greater than num_ramp_steps ({self.num_ramp_steps})"
            )
        return self


class LearningRate(_Config):
    """A learning-rate schedule: exactly one of the four kinds. See :func:`recap_kernels.compute_lr`."""

    constant: _NonNegativeReal | None = None
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

    beta_1: _Real = Field(0.9, ge=0, lt=1)
    beta_2: _Real = Field(0.999, ge=0, lt=1)
    epsilon: _NonNegativeReal = 1e-7


class MultiTaskLearningRates(_Config):
    """One schedule per task tower (in this order) and one for the shared backbone."""

    tower_learning_rates: dict[str, LearningRate]
    backbone_learning_rate: LearningRate | None = None

    @field_validator("tower_learning_rates")
    @classmethod
    def _at_least_one_tower(cls, towers: dict[str, LearningRate]) -> dict[str, LearningRate]:
        # With no tower every parameter would be backbone: that is single_task_learning_rate under another name,
        # and more likely a config whose towers went missing.
        if not towers:
            raise ValueError(
                "tower_learning_rates is empty: a multi-task config needs at least one tower "
                "(for one schedule of every parameter, use single_task_learning_rate)"
            )
        return towers


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
    eps: _NonNegativeReal = 1e-10
    initial_accumulator_value: _NonNegativeReal = 0.0
    lr_decay: _NonNegativeReal = 0.0
    weight_decay: _NonNegativeReal = 0.0

    @model_validator(mode="after")
    def _sparse_without_decay(self) -> AdagradConfig:
        if self.mode == "sparse" and self.weight_decay != 0:
            raise ValueError("weight_decay must be 0 with mode 'sparse': Adagrad cannot decay with sparse gradients")
        return self


class SgdConfig(_Config):
    """SGD for the embedding tables (``torch.optim.SGD``'s arguments; lr comes from the schedule)."""

    momentum: _NonNegativeReal = 0.0
    weight_decay: _NonNegativeReal = 0.0


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

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping names the same key twice (PyYAML's own loaders silently keep the last value)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`DuplicateKeyError` when a mapping repeats a key.

    The error names the key and the lines of both occurrences (and the file, when reading one).
    Keys are compared as the values they load to, so ``1`` and ``1.0`` collide just as they would in
    the resulting ``dict``. Keys that a merge (``<<: *defaults``) brings in may still be overridden by
    the mapping's own keys, as YAML intends; only keys written in the mapping itself must be unique.

    Example::

        yaml.load(text, Loader=UniqueKeyLoader)
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._checked_mappings: set[yaml.MappingNode] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Check ``node``'s own keys, then merge ``<<`` keys into it as ``SafeLoader`` does."""
        # SafeLoader flattens a mapping, in place, before constructing it, and flattens a merged-in mapping
        # before that mapping's own turn: the first call sees the keys as written, later ones see merged keys
        # (which may legitimately repeat), so each mapping is checked once, on its first call.
        if node not in self._checked_mappings:
            self._checked_mappings.add(node)
            self._check_unique_keys(node)
        super().flatten_mapping(node)

    def _check_unique_keys(self, node: yaml.MappingNode) -> None:
        first_occurrence: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = first_occurrence.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader reports it once it builds the mapping
                continue
            if first is not key_node:
                raise DuplicateKeyError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                    key_node.start_mark,
                )


# A mapping value indicator (":" then a blank or the end) or a flow mapping: what YAML text of a config has
# on one line, and what a file name hardly ever has.
_MAPPING_SYNTAX = re.compile(r":(\s|$)|^\s*\{")

_ConfigT = TypeVar("_ConfigT", bound=_Config)


def load_optimizer_config(source: RecapOptimizerConfig | Mapping | str | os.PathLike) -> RecapOptimizerConfig:
    """Load a :class:`RecapOptimizerConfig`.

    Args:
        source: one of

            * a config, returned as is;
            * a mapping;
            * an ``os.PathLike``: a YAML file, whatever its name;
            * a ``str``: the name of a YAML file if such a file exists, whatever its extension
              (``.yaml``, ``.YAML``, ``.yml`` or none). Otherwise it is YAML text if it spans several
              lines or has mapping syntax (a ``": "``, a ``:`` at the end, or a leading ``{``), as
              every config written on one line does; any other string is taken for the name of a
              missing file.

            The document is either a whole training config, whose ``optimizer`` key is read and other
            keys ignored, or the optimizer block alone.

    Raises:
        FileNotFoundError: ``source`` is a path, or a ``str`` read as one, and no such file exists.
        DuplicateKeyError: the YAML repeats a key within one mapping (a ``yaml.YAMLError``, like
            every YAML syntax error).
        TypeError: the document is not a mapping.
        pydantic.ValidationError: the mapping is not a valid config; the message names the field.
    """
    return _load(source, RecapOptimizerConfig, "optimizer")


def load_embedding_optimizer_config(
    source: EmbeddingOptimizerConfig | Mapping | str | os.PathLike,
) -> EmbeddingOptimizerConfig:
    """Load an :class:`EmbeddingOptimizerConfig`, like :func:`load_optimizer_config` (same sources, same errors).

    A whole training config keeps this block under its ``embedding_optimizer`` key.
    """
    return _load(source, EmbeddingOptimizerConfig, "embedding_optimizer")


def _load(source: Any, model: type[_ConfigT], key: str) -> _ConfigT:
    if isinstance(source, model):
        return source
    data, origin, hint = source, "", ""
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _is_a_path(source)):
        data = _read_yaml_file(source)
        origin = f" in file {os.fsdecode(source)!r}"
    elif isinstance(source, str):
        data = yaml.load(source, Loader=UniqueKeyLoader)
        origin = " in the YAML text"
        if "\n" not in source:
            # One line with mapping syntax (else it would have been read as a path): perhaps a path after all.
            hint = f" (read as YAML text because of its mapping syntax; no file {source!r} exists)"
    if not isinstance(data, Mapping):
        got = "an empty document" if data is None else f"{type(data).__name__} {_shorten(repr(data))}"
        raise TypeError(f"expected a mapping for {model.__name__} (or {key!r} in one); got {got}{origin}{hint}")
    # The block alone never has this key (extra keys are forbidden), so its presence means a whole config.
    if key in data:
        data = data[key]
    return model.model_validate(data)


def _is_a_path(text: str) -> bool:
    """Whether ``text`` is read as a path rather than as YAML text (the rule of :func:`load_optimizer_config`)."""
    if os.path.isfile(text):
        return True
    return "\n" not in text and not _MAPPING_SYNTAX.search(text)


def _read_yaml_file(path: str | os.PathLike) -> Any:
    try:
        # Binary: PyYAML decodes UTF-8/16 by the byte order mark, and names the file in its error marks.
        with open(path, "rb") as stream:
            return yaml.load(stream, Loader=UniqueKeyLoader)
    except FileNotFoundError:
        why = "" if isinstance(path, os.PathLike) else " (a one-line string without mapping syntax is a path)"
        raise FileNotFoundError(errno.ENOENT, f"no such config file{why}", os.fsdecode(path)) from None


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
