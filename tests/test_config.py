"""Config models and loaders: recap's YAML shape, one-of rules, null as unset, unknown keys rejected."""

import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from recap_kernels.config import (
    EmbeddingOptimizerConfig,
    LearningRate,
    RecapAdamConfig,
    RecapOptimizerConfig,
    load_embedding_optimizer_config,
    load_optimizer_config,
)

# The example of DESIGN.md ("Builder"), as a whole training config.
DESIGN_EXAMPLE = textwrap.dedent(
    """\
    optimizer:
      adam: {beta_1: 0.95, beta_2: 0.999, epsilon: 1.0e-07}
      multi_task_learning_rates:
        backbone_learning_rate:
          linear_ramp_to_constant: {learning_rate: 0.0001, num_ramp_steps: 1000}
        tower_learning_rates:
          task.a: {constant: 0.001}
          task.b: {linear_ramp_to_cosine: {learning_rate: 0.01, final_learning_rate: 0.001,
                                           num_ramp_steps: 100, final_num_steps: 1000}}
      single_task_learning_rate: null
    """
)


def _check_design_example(config):
    assert isinstance(config, RecapOptimizerConfig)
    assert config.adam == RecapAdamConfig(beta_1=0.95, beta_2=0.999, epsilon=1e-7)
    assert config.single_task_learning_rate is None
    multi = config.multi_task_learning_rates
    assert list(multi.tower_learning_rates) == ["task.a", "task.b"]
    assert multi.tower_learning_rates["task.a"].constant == 0.001
    cosine = multi.tower_learning_rates["task.b"].linear_ramp_to_cosine
    assert (cosine.learning_rate, cosine.final_learning_rate, cosine.num_ramp_steps, cosine.final_num_steps) == (
        0.01,
        0.001,
        100,
        1000,
    )
    ramp = multi.backbone_learning_rate.linear_ramp_to_constant
    assert (ramp.learning_rate, ramp.num_ramp_steps) == (0.0001, 1000)


def test_design_example_loads_as_a_whole_training_config_with_other_keys():
    text = "training: {num_train_steps: 10}\nmodel: {tasks: {task.a: {}}}\n" + DESIGN_EXAMPLE
    _check_design_example(load_optimizer_config(text))


def test_design_example_loads_as_the_block_alone():
    block = yaml.safe_load(DESIGN_EXAMPLE)["optimizer"]
    _check_design_example(load_optimizer_config(block))
    _check_design_example(load_optimizer_config(yaml.safe_dump(block)))


@pytest.mark.parametrize("as_path", [str, Path])
def test_load_from_a_yaml_file(tmp_path, as_path):
    path = tmp_path / "train.yaml"
    path.write_text(DESIGN_EXAMPLE)
    _check_design_example(load_optimizer_config(as_path(path)))


def test_a_config_instance_is_returned_as_is():
    config = load_optimizer_config(DESIGN_EXAMPLE)
    assert load_optimizer_config(config) is config


def test_nulls_count_as_unset():
    # recap's own files spell out every unused alternative as null.
    config = load_optimizer_config(
        textwrap.dedent(
            """\
            optimizer:
              adam: null
              multi_task_learning_rates: null
              single_task_learning_rate:
                constant: null
                linear_ramp_to_constant: null
                linear_ramp_to_cosine: null
                piecewise_constant:
                  learning_rate_boundaries: [5]
                  learning_rate_values: [0.1, 0.01]
            """
        )
    )
    assert config.adam == RecapAdamConfig()
    assert (config.adam.beta_1, config.adam.beta_2, config.adam.epsilon) == (0.9, 0.999, 1e-7)
    assert config.multi_task_learning_rates is None
    assert config.single_task_learning_rate.piecewise_constant.learning_rate_values == [0.1, 0.01]


@pytest.mark.parametrize(
    "data",
    [
        {"constant": 0.1, "piecewise_constant": {"learning_rate_boundaries": [], "learning_rate_values": [0.1]}},
        {"constant": 0.1, "linear_ramp_to_constant": {"learning_rate": 0.1, "num_ramp_steps": 3}},
    ],
)
def test_learning_rate_with_two_kinds_is_rejected_naming_them(data):
    with pytest.raises(ValidationError, match="exactly one of constant, piecewise_constant") as error:
        LearningRate.model_validate(data)
    set_fields = ", ".join(name for name in LearningRate.model_fields if name in data)
    assert f"got {set_fields}" in str(error.value)


def test_learning_rate_with_no_kind_is_rejected():
    with pytest.raises(ValidationError, match=r"LearningRate needs exactly one of .*; got none"):
        LearningRate.model_validate({"constant": None})


@pytest.mark.parametrize(
    ("block", "got"),
    [
        ({"adam": {}}, "got none"),
        ({"adam": {}, "single_task_learning_rate": None, "multi_task_learning_rates": None}, "got none"),
        (
            {
                "single_task_learning_rate": {"constant": 0.1},
                "multi_task_learning_rates": {"tower_learning_rates": {"a": {"constant": 0.1}}},
            },
            "got multi_task_learning_rates, single_task_learning_rate",
        ),
    ],
)
def test_optimizer_needs_exactly_one_of_multi_and_single_task(block, got):
    with pytest.raises(ValidationError, match="multi_task_learning_rates, single_task_learning_rate") as error:
        load_optimizer_config(block)
    assert got in str(error.value)


@pytest.mark.parametrize(
    ("block", "unknown"),
    [
        ({"adam": {"beta_1": 0.9, "lr": 0.1}, "single_task_learning_rate": {"constant": 0.1}}, "lr"),
        ({"single_task_learning_rate": {"constant": 0.1, "cosine": 0.1}}, "cosine"),
        ({"single_task_learning_rate": {"constant": 0.1}, "sgd": {}}, "sgd"),
        (
            {"multi_task_learning_rates": {"tower_learning_rates": {}, "embedding_learning_rate": {"constant": 1}}},
            "embedding_learning_rate",
        ),
    ],
)
def test_unknown_keys_are_rejected(block, unknown):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted") as error:
        load_optimizer_config(block)
    assert unknown in str(error.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"piecewise_constant": {"learning_rate_boundaries": [10], "learning_rate_values": [0.1]}},
            "one more entry than learning_rate_boundaries",
        ),
        (
            {"piecewise_constant": {"learning_rate_boundaries": [10, 10], "learning_rate_values": [1, 2, 3]}},
            "strictly increasing",
        ),
        (
            {
                "linear_ramp_to_cosine": {
                    "learning_rate": 0.1,
                    "final_learning_rate": 0.0,
                    "num_ramp_steps": 10,
                    "final_num_steps": 10,
                }
            },
            r"final_num_steps \(10\) must be greater than num_ramp_steps \(10\)",
        ),
        ({"constant": -0.1}, "greater than or equal to 0"),
    ],
)
def test_malformed_schedules_are_rejected(data, message):
    with pytest.raises(ValidationError, match=message):
        LearningRate.model_validate(data)


def test_adam_betas_must_be_in_range():
    with pytest.raises(ValidationError, match="beta_2"):
        RecapAdamConfig(beta_2=1.0)


def test_yaml_that_is_not_a_mapping_is_a_type_error():
    with pytest.raises(TypeError, match="expected a mapping for RecapOptimizerConfig"):
        load_optimizer_config("- just\n- a list\n")


# -- the embedding optimizer ------------------------------------------------------------------------


def test_embedding_config_loads_from_a_whole_config_and_alone():
    whole = textwrap.dedent(
        """\
        optimizer: {single_task_learning_rate: {constant: 0.1}}
        embedding_optimizer:
          learning_rate: {constant: 0.05}
          adagrad: {eps: 1.0e-08, initial_accumulator_value: 0.1, mode: sparse}
          sgd: null
        """
    )
    config = load_embedding_optimizer_config(whole)
    assert config.learning_rate.constant == 0.05
    assert config.sgd is None
    adagrad = config.adagrad
    assert (adagrad.mode, adagrad.eps, adagrad.initial_accumulator_value) == ("sparse", 1e-8, 0.1)
    assert (adagrad.lr_decay, adagrad.weight_decay) == (0.0, 0.0)
    assert load_embedding_optimizer_config(yaml.safe_load(whole)["embedding_optimizer"]) == config


def test_embedding_config_defaults():
    config = EmbeddingOptimizerConfig(learning_rate={"constant": 0.1}, adagrad={})
    assert config.adagrad.mode == "dense"
    assert (config.adagrad.eps, config.adagrad.initial_accumulator_value) == (1e-10, 0.0)
    assert EmbeddingOptimizerConfig(learning_rate={"constant": 0.1}, sgd={}).sgd.momentum == 0.0


@pytest.mark.parametrize(
    ("extra", "got"),
    [({}, "got none"), ({"adagrad": {}, "sgd": {}}, "got adagrad, sgd")],
)
def test_embedding_config_needs_exactly_one_optimizer(extra, got):
    with pytest.raises(ValidationError, match=f"exactly one of adagrad, sgd; {got}"):
        EmbeddingOptimizerConfig.model_validate({"learning_rate": {"constant": 0.1}, **extra})


def test_embedding_learning_rate_comes_from_the_schedule_only():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        EmbeddingOptimizerConfig.model_validate({"learning_rate": {"constant": 0.1}, "adagrad": {"lr": 0.1}})


def test_sparse_adagrad_rejects_weight_decay():
    with pytest.raises(ValidationError, match="weight_decay must be 0 with mode 'sparse'"):
        EmbeddingOptimizerConfig.model_validate(
            {"learning_rate": {"constant": 0.1}, "adagrad": {"mode": "sparse", "weight_decay": 0.01}}
        )
