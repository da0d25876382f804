"""build_optimizer: recap's parameter grouping, per-group schedules, and the combined optimizer."""

import copy
import io

import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

from recap_kernels import build_optimizer, compute_lr, optim
from recap_kernels.backends import BACKEND_NAMES, get_backend
from recap_kernels.builder import CombinedOptimizer
from recap_kernels.config import DuplicateKeyError

TASKS = ("is_click.v2", "is_like")


class HeavyRanker(nn.Module):
    """A miniature recap model: embedding tables, a shared backbone, one tower per task.

    Parameter names follow recap's layout, e.g. ``towers.is_click__v2.0.weight`` for task
    ``is_click.v2`` and ``embedding_bags.user.weight`` for a table.
    """

    def __init__(self, tasks=TASKS, *, sparse=False, backbone=True):
        super().__init__()
        self.embedding_bags = nn.ModuleDict({"user": nn.EmbeddingBag(20, 4, mode="sum", sparse=sparse)})
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU()) if backbone else nn.Identity()
        width = 8 if backbone else 4
        self.towers = nn.ModuleDict(
            {task.replace(".", "__"): nn.Sequential(nn.Linear(width, 4), nn.ReLU(), nn.Linear(4, 1)) for task in tasks}
        )

    def forward(self, ids, offsets):
        hidden = self.backbone(self.embedding_bags["user"](ids, offsets))
        return torch.cat([tower(hidden) for tower in self.towers.values()], dim=1)


def _ramp(lr, steps):
    return {"linear_ramp_to_constant": {"learning_rate": lr, "num_ramp_steps": steps}}


# Towers deliberately listed in another order than the model registers them: config order wins.
TOWER_LRS = {"is_like": {"constant": 0.02}, "is_click.v2": _ramp(0.03, 2)}
BACKBONE_LR = _ramp(0.01, 4)


def _multi_task(towers=TOWER_LRS, backbone=BACKBONE_LR):
    return {
        "adam": {"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-6},
        "multi_task_learning_rates": {"tower_learning_rates": towers, "backbone_learning_rate": backbone},
    }


ADAGRAD = {
    "learning_rate": {"piecewise_constant": {"learning_rate_boundaries": [3], "learning_rate_values": [0.1, 0.05]}},
    "adagrad": {"initial_accumulator_value": 0.1, "eps": 1e-8},
}


def _params(module):
    return {id(p) for p in module.parameters()}


def _batches(steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, 3, 7, 9])
    return [
        (torch.randint(0, 20, (12,), generator=generator), offsets, torch.randn(4, len(TASKS), generator=generator))
        for _ in range(steps)
    ]


def _train(model, optimizer, scheduler, batches):
    for ids, offsets, target in batches:
        optimizer.zero_grad()
        ((model(ids, offsets) - target) ** 2).mean().backward()
        optimizer.step()
        scheduler.step()


# -- grouping ---------------------------------------------------------------------------------------


def test_multi_task_groups_towers_in_config_order_then_backbone_then_embeddings():
    model = HeavyRanker()
    optimizer, _ = build_optimizer(model, _multi_task(), ADAGRAD)

    assert isinstance(optimizer, CombinedOptimizer)
    assert isinstance(optimizer, torch.optim.Optimizer)
    groups = optimizer.param_groups
    assert [g["name"] for g in groups] == ["is_like", "is_click.v2", "backbone", "embeddings"]
    assert [{id(p) for p in g["params"]} for g in groups] == [
        _params(model.towers["is_like"]),
        _params(model.towers["is_click__v2"]),
        _params(model.backbone),
        _params(model.embedding_bags),
    ]
    assert groups[:3] == optimizer.dense.param_groups
    assert groups[3] is optimizer.embedding.param_groups[0]


def test_optimizers_and_hyperparameters_come_from_the_configs():
    optimizer, _ = build_optimizer(HeavyRanker(), _multi_task(), ADAGRAD, backend="torch")
    assert type(optimizer.dense) is optim.Adam
    assert type(optimizer.embedding) is optim.Adagrad
    assert optimizer.dense.backend == optimizer.embedding.backend == "torch"
    for group in optimizer.dense.param_groups:
        assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.99), 1e-6, 0)
    embedding = optimizer.embedding.param_groups[0]
    assert (embedding["eps"], embedding["initial_accumulator_value"], embedding["lr_decay"]) == (1e-8, 0.1, 0)
    [table] = embedding["params"]
    assert torch.equal(optimizer.embedding.state[table]["sum"], torch.full_like(table, 0.1))


def test_sgd_embedding_optimizer():
    sgd = {"learning_rate": {"constant": 0.5}, "sgd": {"momentum": 0.9}}
    model = HeavyRanker()
    optimizer, scheduler = build_optimizer(model, _multi_task(), sgd)
    assert type(optimizer.embedding) is torch.optim.SGD
    assert optimizer.param_groups[-1]["momentum"] == 0.9
    assert scheduler.get_last_lr()[-1] == 0.5
    _train(model, optimizer, scheduler, _batches(1))
    assert "torch" in optimizer.backends_used()


def test_single_task_is_one_group_of_everything():
    model = HeavyRanker()
    optimizer, scheduler = build_optimizer(model, {"single_task_learning_rate": {"constant": 0.1}})
    assert type(optimizer) is optim.Adam
    [group] = optimizer.param_groups
    assert group["name"] == "single_task"
    assert {id(p) for p in group["params"]} == _params(model)
    assert scheduler.get_last_lr() == [0.1]


def test_single_task_with_an_embedding_optimizer_keeps_the_tables_apart():
    model = HeavyRanker()
    optimizer, scheduler = build_optimizer(model, {"single_task_learning_rate": {"constant": 0.1}}, ADAGRAD)
    assert [g["name"] for g in optimizer.param_groups] == ["single_task", "embeddings"]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == _params(model.embedding_bags)
    assert scheduler.get_last_lr() == [0.1, 0.1]


def test_configs_may_be_yaml_text():
    text = "optimizer:\n  single_task_learning_rate: {constant: 0.25}\n"
    _, scheduler = build_optimizer(nn.Linear(2, 2), text)
    assert scheduler.get_last_lr() == [0.25]


def test_configs_may_be_files_named_with_any_extension(tmp_path):
    # Recap jobs name configs freely: an upper-case extension, or none, is still a file, not YAML text.
    dense, embedding = tmp_path / "optimizer", tmp_path / "embedding.YAML"
    dense.write_text(yaml.safe_dump({"optimizer": _multi_task()}, sort_keys=False))
    embedding.write_text(yaml.safe_dump({"embedding_optimizer": ADAGRAD}))
    optimizer, scheduler = build_optimizer(HeavyRanker(), str(dense), str(embedding))
    assert [g["name"] for g in optimizer.param_groups] == ["is_like", "is_click.v2", "backbone", "embeddings"]
    assert scheduler.get_last_lr() == [0.02, 0.0, 0.0, 0.1]


def test_a_missing_config_file_is_reported_by_name(tmp_path):
    missing = tmp_path / "embedding.YAML"
    with pytest.raises(FileNotFoundError, match="no such config file") as error:
        build_optimizer(HeavyRanker(), _multi_task(), str(missing))
    assert error.value.filename == str(missing)


def test_a_config_file_repeating_a_tower_is_an_error_not_the_last_schedule(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        "optimizer:\n"
        "  multi_task_learning_rates:\n"
        "    backbone_learning_rate: {constant: 0.01}\n"
        "    tower_learning_rates:\n"
        "      is_like: {constant: 0.02}\n"
        "      is_click.v2: {constant: 0.03}\n"
        "      is_like: {constant: 0.5}\n"
    )
    with pytest.raises(DuplicateKeyError, match=r"found duplicate key 'is_like' \(first at line 5\)"):
        build_optimizer(HeavyRanker(), path, ADAGRAD)


def test_a_boolean_learning_rate_is_an_error_not_a_rate_of_one():
    with pytest.raises(ValidationError, match="single_task_learning_rate.constant"):
        build_optimizer(nn.Linear(2, 2), "optimizer:\n  single_task_learning_rate: {constant: true}\n")


# -- errors: every group needs a schedule and every schedule a group --------------------------------


def test_a_parameter_in_two_towers_is_an_error():
    model = nn.Module()
    model.towers = nn.ModuleDict({"a": nn.ModuleDict({"b": nn.Linear(2, 1)})})
    towers = {"a": {"constant": 0.1}, "b": {"constant": 0.1}}
    with pytest.raises(ValueError, match=r"parameter 'towers\.a\.b\.weight' matches towers 'a' and 'b'"):
        build_optimizer(model, _multi_task(towers, backbone=None))


def test_an_empty_tower_mapping_is_an_error_not_a_backbone_only_model():
    with pytest.raises(ValidationError, match="a multi-task config needs at least one tower"):
        build_optimizer(HeavyRanker(), _multi_task(towers={}), ADAGRAD)


def test_a_tower_without_parameters_is_an_error():
    towers = {"is_like": {"constant": 0.1}, "is_click": {"constant": 0.1}}
    with pytest.raises(
        ValueError, match=r"tower 'is_click' has a learning rate but no parameter name contains '\.is_click\.'"
    ):
        build_optimizer(HeavyRanker(), _multi_task(towers), ADAGRAD)


def test_backbone_parameters_without_a_schedule_are_an_error():
    message = r"2 parameters fall in group 'backbone' \('backbone\.0\.weight', 'backbone\.0\.bias'\)"
    with pytest.raises(ValueError, match=message + " but backbone_learning_rate is not set"):
        build_optimizer(HeavyRanker(), _multi_task(backbone=None), ADAGRAD)


def test_a_backbone_schedule_without_parameters_is_an_error():
    with pytest.raises(ValueError, match="backbone_learning_rate is set but group 'backbone' is empty"):
        build_optimizer(HeavyRanker(backbone=False), _multi_task(), ADAGRAD)


def test_embedding_parameters_without_an_embedding_optimizer_are_an_error():
    with pytest.raises(
        ValueError,
        match=r"fall in group 'embeddings' \('embedding_bags\.user\.weight'\) but emb_optimizer_config is not set",
    ):
        build_optimizer(HeavyRanker(), _multi_task())


def test_an_embedding_optimizer_without_embedding_parameters_is_an_error():
    model = nn.Sequential(nn.Linear(2, 2))
    message = "emb_optimizer_config is set but group 'embeddings' is empty: no parameter name contains 'embedding_bags'"
    with pytest.raises(ValueError, match=message):
        build_optimizer(model, {"single_task_learning_rate": {"constant": 0.1}}, ADAGRAD)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_rowwise_adagrad_trains_the_tables(sparse):
    model = HeavyRanker(sparse=sparse)
    rowwise = {**ADAGRAD, "adagrad": {"mode": "rowwise", "initial_accumulator_value": 0.1}}
    optimizer, scheduler = build_optimizer(model, _multi_task(), rowwise)
    assert isinstance(optimizer.embedding, optim.RowWiseAdagrad)
    table = model.embedding_bags["user"].weight
    before = table.detach().clone()
    _train(model, optimizer, scheduler, _batches(2))
    assert table.grad.is_sparse == sparse
    assert optimizer.embedding.state[table]["sum"].shape == (table.shape[0], 1)
    assert not torch.equal(table, before)


def test_a_sparse_gradient_in_an_adam_group_names_the_group():
    model = HeavyRanker()
    model.lookup = nn.Embedding(5, 3, sparse=True)  # not an embedding_bags table: it lands in the backbone
    optimizer, _ = build_optimizer(model, _multi_task(), ADAGRAD)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.lookup.weight.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 3), (5, 3))
    with pytest.raises(RuntimeError, match=r"Adam does not support sparse gradients.*shape \(5, 3\) in param group "
                                           r"'backbone'"):
        optimizer.step()


# -- schedules and training -------------------------------------------------------------------------


def test_each_group_follows_its_own_schedule():
    model = HeavyRanker()
    optimizer, scheduler = build_optimizer(model, _multi_task(), ADAGRAD)
    expected_by_step = {
        # is_like constant 0.02; is_click.v2 ramps to 0.03 over 2 steps; backbone to 0.01 over 4;
        # embeddings piecewise 0.1 then 0.05 from step 3.
        0: [0.02, 0.0, 0.0, 0.1],
        1: [0.02, 0.015, 0.0025, 0.1],
        3: [0.02, 0.03, 0.0075, 0.05],
        6: [0.02, 0.03, 0.01, 0.05],
    }
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected_by_step[0])
    config = _multi_task()["multi_task_learning_rates"]
    schedules = [*config["tower_learning_rates"].values(), config["backbone_learning_rate"], ADAGRAD["learning_rate"]]
    for step in range(1, 7):
        _train(model, optimizer, scheduler, _batches(1, seed=step))
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs == [compute_lr(cfg, step) for cfg in scheduler.lr_configs]
        assert [cfg.model_dump(exclude_none=True) for cfg in scheduler.lr_configs] == schedules
        if step in expected_by_step:
            assert lrs == pytest.approx(expected_by_step[step])
    # The wrapped optimizers read the same dicts: the scheduler's rates reach them.
    assert optimizer.dense.param_groups[2]["lr"] == 0.01
    assert optimizer.embedding.param_groups[0]["lr"] == 0.05


def test_training_resumes_from_a_combined_state_dict_with_identical_numbers():
    model = HeavyRanker()
    resumed_model = copy.deepcopy(model)
    batches = _batches(6, seed=1)

    optimizer, scheduler = build_optimizer(model, _multi_task(), ADAGRAD)
    _train(model, optimizer, scheduler, batches)

    # Same start: 3 steps, a checkpoint, a freshly built optimizer loading it, then the last 3 steps.
    first, first_scheduler = build_optimizer(resumed_model, _multi_task(), ADAGRAD)
    _train(resumed_model, first, first_scheduler, batches[:3])
    buffer = io.BytesIO()
    torch.save({"optimizer": first.state_dict(), "scheduler": first_scheduler.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert set(checkpoint["optimizer"]) == {"dense", "embedding"}

    second, second_scheduler = build_optimizer(resumed_model, _multi_task(), ADAGRAD)
    second.load_state_dict(checkpoint["optimizer"])
    second_scheduler.load_state_dict(checkpoint["scheduler"])
    _train(resumed_model, second, second_scheduler, batches[3:])

    for (name, param), resumed_param in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(param, resumed_param), name
        state, resumed_state = optimizer.state[param], second.state[resumed_param]
        assert state.keys() == resumed_state.keys()
        for key in state:
            assert torch.equal(state[key], resumed_state[key]), (name, key)
    assert [g["lr"] for g in second.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert second.backends_used() and second.backends_used() <= set(BACKEND_NAMES)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
def test_sparse_embedding_gradients_train_with_adagrad():
    model = HeavyRanker(sparse=True)
    sparse = {**ADAGRAD, "adagrad": {"mode": "sparse"}}
    optimizer, scheduler = build_optimizer(model, _multi_task(), sparse)
    table = model.embedding_bags["user"].weight
    before = table.detach().clone()
    _train(model, optimizer, scheduler, _batches(2))
    assert table.grad.is_sparse
    assert not torch.equal(table, before)


@pytest.mark.skipif(not get_backend("cpu").available(torch.device("cpu")).ok, reason="no CPU kernels in this build")
@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
def test_the_tables_may_have_their_own_backend():
    model = HeavyRanker(sparse=True)
    optimizer, scheduler = build_optimizer(model, _multi_task(), {**ADAGRAD, "adagrad": {"mode": "sparse"}},
                                           backend="cpu", embedding_backend="torch")
    _train(model, optimizer, scheduler, _batches(2))
    assert optimizer.dense.backends_used() == {"cpu"} and optimizer.embedding.backends_used() == {"torch"}


def test_combined_step_zero_grad_and_closure():
    model = HeavyRanker()
    optimizer, _ = build_optimizer(model, _multi_task(), ADAGRAD)
    [(ids, offsets, target)] = _batches(1)

    def closure():
        optimizer.zero_grad()
        loss = ((model(ids, offsets) - target) ** 2).mean()
        loss.backward()
        return loss

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = optimizer.step(closure)
    assert loss.item() > 0
    # Both optimizers stepped: the constant-rate tower and the embedding table moved.
    assert not torch.equal(model.towers["is_like"][0].weight, before["towers.is_like.0.weight"])
    assert not torch.equal(model.embedding_bags["user"].weight, before["embedding_bags.user.weight"])
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_combined_optimizer_rejects_foreign_state_dicts_and_new_groups():
    optimizer, _ = build_optimizer(HeavyRanker(), _multi_task(), ADAGRAD)
    with pytest.raises(ValueError, match=r"keys 'dense' and 'embedding' \(or torchrec's keyed 'state'\); got \['model'\]"):
        optimizer.load_state_dict({"model": {}})
    with pytest.raises(ValueError, match=r"state for parameters this optimizer does not hold: \['dense.towers.x'\]"):
        optimizer.load_state_dict({"state": {"dense.towers.x": {}}})
    with pytest.raises(TypeError, match=r"add the group to CombinedOptimizer\.dense or \.embedding"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def test_combined_optimizer_survives_deepcopy():
    optimizer, _ = build_optimizer(HeavyRanker(), _multi_task(), ADAGRAD)
    clone = copy.deepcopy(optimizer)
    assert [g["name"] for g in clone.param_groups] == [g["name"] for g in optimizer.param_groups]
    assert clone.param_groups[-1] is clone.embedding.param_groups[0]


# -- torchrec's conventions -------------------------------------------------------------------------


def test_combined_optimizer_names_parameters_as_torchrecs_combined_optimizer():
    model = HeavyRanker()
    optimizer, _ = build_optimizer(model, _multi_task(), ADAGRAD)
    assert optimizer.optimizers == [("dense", optimizer.dense), ("embedding", optimizer.embedding)]
    assert CombinedOptimizer.prepend_opt_key("towers.a.weight", "dense") == "dense.towers.a.weight"
    assert CombinedOptimizer.prepend_opt_key("w", "") == "w" and CombinedOptimizer.prepend_opt_key("", "k") == "k"
    named = dict(model.named_parameters())
    expected = {("embedding." if name.startswith("embedding_bags") else "dense.") + name: p for name, p in named.items()}
    assert optimizer.params.keys() == expected.keys()
    assert all(optimizer.params[key] is p for key, p in expected.items())
    # without names (built by hand), a parameter is named by its position in its optimizer
    unnamed = CombinedOptimizer(optimizer.dense, optimizer.embedding)
    assert list(unnamed.params)[:2] == ["dense.0", "dense.1"] and "embedding.0" in unnamed.params


@pytest.mark.parametrize("save_param_groups", [False, True])
def test_training_resumes_from_a_keyed_state_dict_with_identical_numbers(save_param_groups):
    model = HeavyRanker()
    resumed_model = copy.deepcopy(model)
    batches = _batches(6, seed=2)
    optimizer, scheduler = build_optimizer(model, _multi_task(), ADAGRAD)
    _train(model, optimizer, scheduler, batches)

    first, first_scheduler = build_optimizer(resumed_model, _multi_task(), ADAGRAD)
    _train(resumed_model, first, first_scheduler, batches[:3])
    first.save_param_groups(save_param_groups)
    buffer = io.BytesIO()
    torch.save(first.keyed_state_dict(), buffer)
    buffer.seek(0)
    keyed = torch.load(buffer, weights_only=True)
    assert set(keyed) == ({"state", "param_groups"} if save_param_groups else {"state"})
    assert set(keyed["state"]) == set(first.params)
    assert keyed["state"]["embedding.embedding_bags.user.weight"].keys() == {"step", "sum"}
    if save_param_groups:
        assert keyed["param_groups"][-1]["params"] == ["embedding.embedding_bags.user.weight"]
        assert [g["name"] for g in keyed["param_groups"]] == [g["name"] for g in first.param_groups]

    second, second_scheduler = build_optimizer(resumed_model, _multi_task(), ADAGRAD)
    second.init_state()  # as a torchrec loop does before loading in place; ours loads without it too
    second.load_state_dict(keyed)
    second_scheduler.load_state_dict(first_scheduler.state_dict())
    if not save_param_groups:  # torchrec's default: the loop sets the groups again (here: the schedules' rates)
        for group, lr in zip(second.param_groups, second_scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
    _train(resumed_model, second, second_scheduler, batches[3:])
    for (name, param), resumed_param in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(param, resumed_param), name
        for key, value in optimizer.state[param].items():
            assert torch.equal(value, second.state[resumed_param][key]), (name, key)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
def test_init_state_creates_every_state_without_moving_a_weight():
    model = HeavyRanker(sparse=True)
    optimizer, _ = build_optimizer(model, _multi_task(), {**ADAGRAD, "adagrad": {"mode": "sparse"}})
    lrs = [group["lr"] for group in optimizer.param_groups]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.init_state({"embedding.embedding_bags.user.weight"})
    assert len(optimizer.state) == len(before)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert [group["lr"] for group in optimizer.param_groups] == lrs
