"""Config models and loaders: recap's YAML shape, one-of rules, null as unset, unknown keys rejected."""

import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from recap_kernels.config import (
    DuplicateKeyError,
    EmbeddingOptimizerConfig,
    LearningRate,
    RecapAdamConfig,
    RecapOptimizerConfig,
    UniqueKeyLoader,
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
            {
                "multi_task_learning_rates": {
                    "tower_learning_rates": {"a": {"constant": 0.1}},
                    "embedding_learning_rate": {"constant": 1},
                }
            },
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


def test_yaml_that_is_not_a_mapping_is_a_type_error_saying_what_it_got():
    expected = r"expected a mapping for RecapOptimizerConfig .*; got list \['just', 'a list'\] in the YAML text$"
    with pytest.raises(TypeError, match=expected):
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


# -- duplicate keys ---------------------------------------------------------------------------------

TOWERS_WITH_A_REPEATED_TASK = textwrap.dedent(
    """\
    optimizer:
      multi_task_learning_rates:
        backbone_learning_rate: {constant: 0.1}
        tower_learning_rates:
          task.a: {constant: 0.001}
          task.b: {constant: 0.002}
          task.a: {constant: 0.003}
    """
)


@pytest.mark.parametrize(
    ("text", "key", "first_line", "second_line"),
    [
        (TOWERS_WITH_A_REPEATED_TASK, "'task.a'", 5, 7),
        (DESIGN_EXAMPLE + "optimizer: {single_task_learning_rate: {constant: 0.1}}\n", "'optimizer'", 1, 11),
        ("single_task_learning_rate: {constant: 0.1, constant: 0.2}", "'constant'", 1, 1),
        ("adam: {beta_1: 0.9}\nadam: {beta_2: 0.99}\nsingle_task_learning_rate: {constant: 0.1}\n", "'adam'", 1, 2),
    ],
    ids=["tower", "whole-config-key", "flow-mapping", "block-key"],
)
def test_a_duplicate_key_is_an_error_naming_the_key_and_both_lines(text, key, first_line, second_line):
    with pytest.raises(DuplicateKeyError) as error:
        load_optimizer_config(text)
    message = str(error.value)
    assert f"found duplicate key {key} (first at line {first_line})" in message
    assert f"line {second_line}, column" in message
    assert isinstance(error.value, yaml.YAMLError)


def test_a_duplicate_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        "embedding_optimizer:\n  learning_rate: {constant: 0.1}\n  adagrad: {eps: 1.0e-08}\n  adagrad: {eps: 0.1}\n"
    )
    with pytest.raises(DuplicateKeyError, match="found duplicate key 'adagrad' \\(first at line 3\\)") as error:
        load_embedding_optimizer_config(str(path))
    assert f'in "{path}", line 4' in str(error.value)


@pytest.mark.parametrize(
    "text",
    [
        # A merge brings keys in; the mapping's own keys override them, as YAML intends.
        "defaults: &defaults {learning_rate: 0.1, num_ramp_steps: 10}\nramp: {<<: *defaults, num_ramp_steps: 20}\n",
        # A merged-in mapping with a merge of its own, also used on its own afterwards.
        "base: &b {a: 1, c: 3}\ny: {<<: &m {<<: *b, a: 5}, z: *m}\n",
        "merged: {<<: [{a: 1}, {a: 2, b: 2}], b: 3}\n",
    ],
)
def test_the_unique_key_loader_still_lets_a_mapping_override_merged_keys(text):
    assert yaml.load(text, Loader=UniqueKeyLoader) == yaml.safe_load(text)


@pytest.mark.parametrize(
    "text",
    [
        "defaults: &defaults {a: 1, a: 2}\nuse: {<<: *defaults}\n",
        "1: one\n1.0: also one\n",
    ],
    ids=["inside-a-merged-anchor", "equal-as-values"],
)
def test_the_unique_key_loader_rejects_keys_that_collide_anywhere(text):
    with pytest.raises(DuplicateKeyError, match="found duplicate key"):
        yaml.load(text, Loader=UniqueKeyLoader)


# -- strict numbers ---------------------------------------------------------------------------------

RAMP = "single_task_learning_rate: {linear_ramp_to_constant: {learning_rate: 0.1, num_ramp_steps: 10}}"


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("single_task_learning_rate: {constant: true}", "single_task_learning_rate.constant", "valid number"),
        ("single_task_learning_rate: {constant: false}", "single_task_learning_rate.constant", "valid number"),
        ("single_task_learning_rate: {constant: '0.1'}", "single_task_learning_rate.constant", "valid number"),
        ("single_task_learning_rate: {constant: .inf}", "single_task_learning_rate.constant", "finite number"),
        ("single_task_learning_rate: {constant: .nan}", "single_task_learning_rate.constant", "finite number"),
        (
            RAMP.replace("learning_rate: 0.1", 'learning_rate: "0.1"'),
            "single_task_learning_rate.linear_ramp_to_constant.learning_rate",
            "valid number",
        ),
        (
            RAMP.replace("num_ramp_steps: 10", "num_ramp_steps: true"),
            "single_task_learning_rate.linear_ramp_to_constant.num_ramp_steps",
            "valid integer",
        ),
        (
            RAMP.replace("num_ramp_steps: 10", "num_ramp_steps: '10'"),
            "single_task_learning_rate.linear_ramp_to_constant.num_ramp_steps",
            "valid integer",
        ),
        (
            # PyYAML reads 1e3 (no dot) as a string, which must not pass as 1000.
            RAMP.replace("num_ramp_steps: 10", "num_ramp_steps: 1e3"),
            "single_task_learning_rate.linear_ramp_to_constant.num_ramp_steps",
            "valid integer",
        ),
        (
            "single_task_learning_rate: {piecewise_constant: {learning_rate_boundaries: [true],"
            " learning_rate_values: [0.1, 0.01]}}",
            "single_task_learning_rate.piecewise_constant.learning_rate_boundaries.0",
            "valid integer",
        ),
        (
            "single_task_learning_rate: {piecewise_constant: {learning_rate_boundaries: [5],"
            " learning_rate_values: [0.1, '0.01']}}",
            "single_task_learning_rate.piecewise_constant.learning_rate_values.1",
            "valid number",
        ),
        ("adam: {beta_1: true}\n" + RAMP, "adam.beta_1", "valid number"),
        ("adam: {epsilon: '1.0e-07'}\n" + RAMP, "adam.epsilon", "valid number"),
        (
            "multi_task_learning_rates: {tower_learning_rates: {a: {constant: yes}}}",
            "multi_task_learning_rates.tower_learning_rates.a.constant",
            "valid number",
        ),
    ],
)
def test_numbers_are_strict_and_errors_name_the_field(text, field, message):
    with pytest.raises(ValidationError, match=message) as error:
        load_optimizer_config(text)
    assert f"\n{field}\n" in str(error.value)


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ({"learning_rate": {"constant": 0.1}, "adagrad": {"eps": True}}, "adagrad.eps"),
        (
            {"learning_rate": {"constant": 0.1}, "adagrad": {"initial_accumulator_value": "0.1"}},
            "adagrad.initial_accumulator_value",
        ),
        ({"learning_rate": {"constant": 0.1}, "sgd": {"momentum": "0.9"}}, "sgd.momentum"),
        ({"learning_rate": {"constant": False}, "sgd": {}}, "learning_rate.constant"),
    ],
)
def test_embedding_config_numbers_are_strict(block, field):
    with pytest.raises(ValidationError, match="Input should be a valid number") as error:
        load_embedding_optimizer_config(block)
    assert f"\n{field}" in str(error.value)


def test_ints_are_accepted_as_reals_and_whole_floats_as_step_counts():
    # Guards against over-strictness: `constant: 1` is a learning rate of 1.0, and PyYAML's 1.0e+3 is 1000 steps.
    config = load_optimizer_config("single_task_learning_rate: {constant: 1}\nadam: {beta_1: 0, epsilon: 1}")
    assert config.single_task_learning_rate.constant == 1.0
    assert type(config.single_task_learning_rate.constant) is float
    assert (config.adam.beta_1, config.adam.epsilon) == (0.0, 1.0)
    ramp = load_optimizer_config(RAMP.replace("num_ramp_steps: 10", "num_ramp_steps: 1.0e+3"))
    assert ramp.single_task_learning_rate.linear_ramp_to_constant.num_ramp_steps == 1000
    assert type(ramp.single_task_learning_rate.linear_ramp_to_constant.num_ramp_steps) is int
    with pytest.raises(ValidationError, match="got a number with a fractional part"):
        load_optimizer_config(RAMP.replace("num_ramp_steps: 10", "num_ramp_steps: 10.5"))


# -- degenerate configs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "multi_task_learning_rates: {tower_learning_rates: {}, backbone_learning_rate: {constant: 0.1}}",
        "optimizer:\n  multi_task_learning_rates:\n    tower_learning_rates: {}\n",
    ],
)
def test_an_empty_tower_mapping_is_rejected(text):
    with pytest.raises(ValidationError, match="a multi-task config needs at least one tower") as error:
        load_optimizer_config(text)
    assert "\nmulti_task_learning_rates.tower_learning_rates\n" in str(error.value)


# -- what a source is: a file, YAML text or a mapping -----------------------------------------------


@pytest.mark.parametrize("name", ["train.YAML", "train.Yml", "train", "train.cfg", "optimizer.yaml.bak"])
def test_a_string_naming_an_existing_file_is_read_whatever_the_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text(DESIGN_EXAMPLE)
    _check_design_example(load_optimizer_config(str(path)))


def test_a_relative_path_without_an_extension_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "embedding").write_text("learning_rate: {constant: 0.05}\nsgd: {}\n")
    monkeypatch.chdir(tmp_path)
    assert load_embedding_optimizer_config("embedding").learning_rate.constant == 0.05


@pytest.mark.parametrize("name", ["missing.yaml", "missing.YAML", "configs/missing", "C:/configs/train.YAML"])
def test_a_path_like_string_naming_no_file_is_a_file_not_found_error(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such config file") as error:
        load_optimizer_config(name)
    assert error.value.filename == name
    assert repr(name) in str(error.value)


def test_a_missing_path_object_is_a_file_not_found_error_naming_it(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(FileNotFoundError, match="no such config file") as error:
        load_embedding_optimizer_config(path)
    assert error.value.filename == str(path)


@pytest.mark.parametrize(
    ("content", "got"), [("- a\n- b\n", r"got list \['a', 'b'\]"), ("", "got an empty document")]
)
def test_a_file_that_is_not_a_mapping_is_a_type_error_naming_the_file(tmp_path, content, got):
    path = tmp_path / "train.YAML"
    path.write_text(content)
    with pytest.raises(TypeError, match=f"expected a mapping for RecapOptimizerConfig .*; {got} in file") as error:
        load_optimizer_config(str(path))
    assert repr(str(path)) in str(error.value)


def test_one_line_text_that_is_not_a_mapping_says_no_such_file_exists():
    with pytest.raises(TypeError, match=r"got str 'configs: train\.yaml' in the YAML text .*no file .* exists"):
        load_optimizer_config("'configs: train.yaml'")


@pytest.mark.parametrize(
    "text",
    [
        "{single_task_learning_rate: {constant: 0.25}}",
        "single_task_learning_rate: {constant: 0.25}",
        '{"single_task_learning_rate": {"constant": 0.25}}',
        "optimizer:\n  single_task_learning_rate:\n    constant: 0.25",
    ],
)
def test_one_line_yaml_text_is_still_text(text):
    # Guards the path rule from the other side: mapping syntax on one line is text, not a missing file.
    assert load_optimizer_config(text).single_task_learning_rate.constant == 0.25
