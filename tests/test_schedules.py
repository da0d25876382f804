"""compute_lr against hand-computed rates, and RecapLRScheduler driving param groups with it."""

import io
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from recap_kernels import compute_lr
from recap_kernels.config import LearningRate
from recap_kernels.schedules import RecapLRScheduler

CONSTANT = LearningRate(constant=0.5)
PIECEWISE = LearningRate(
    piecewise_constant={"learning_rate_boundaries": [10, 20], "learning_rate_values": [1.0, 0.5, 0.1]}
)
RAMP = LearningRate(linear_ramp_to_constant={"learning_rate": 0.01, "num_ramp_steps": 100})
COSINE = LearningRate(
    linear_ramp_to_cosine={
        "learning_rate": 0.01,
        "final_learning_rate": 0.001,
        "num_ramp_steps": 100,
        "final_num_steps": 1100,
    }
)


@pytest.mark.parametrize(
    ("lr_config", "step", "expected"),
    [
        (CONSTANT, 0, 0.5),
        (CONSTANT, 10**6, 0.5),
        # bisect_right: a boundary step already takes the next value.
        (PIECEWISE, 0, 1.0),
        (PIECEWISE, 9, 1.0),
        (PIECEWISE, 10, 0.5),
        (PIECEWISE, 19, 0.5),
        (PIECEWISE, 20, 0.1),
        (PIECEWISE, 10**6, 0.1),
        (RAMP, 0, 0.0),
        (RAMP, 25, 0.0025),
        (RAMP, 99, 0.0099),
        (RAMP, 100, 0.01),
        (RAMP, 150, 0.01),
        (COSINE, 0, 0.0),
        (COSINE, 50, 0.005),
        (COSINE, 100, 0.01),
        # A quarter of the decay: 0.001 + 0.009 * 0.5 * (1 + cos(pi / 4)).
        (COSINE, 350, 0.008681980515339464),
        # Half-way: cos(pi / 2) = 0, so the mean of 0.01 and 0.001.
        (COSINE, 600, 0.0055),
        (COSINE, 1099, 0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * 999 / 1000))),
        (COSINE, 1100, 0.001),
        (COSINE, 5000, 0.001),
    ],
)
def test_compute_lr_matches_hand_computed_rates(lr_config, step, expected):
    assert compute_lr(lr_config, step) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_zero_ramp_steps_start_at_the_full_rate():
    ramp = LearningRate(linear_ramp_to_constant={"learning_rate": 0.3, "num_ramp_steps": 0})
    cosine = LearningRate(
        linear_ramp_to_cosine={
            "learning_rate": 0.3,
            "final_learning_rate": 0.1,
            "num_ramp_steps": 0,
            "final_num_steps": 4,
        }
    )
    assert compute_lr(ramp, 0) == 0.3
    assert compute_lr(cosine, 0) == pytest.approx(0.3)
    assert compute_lr(cosine, 2) == pytest.approx(0.2)


def test_compute_lr_reads_any_object_of_the_config_shape():
    plain = SimpleNamespace(
        constant=None,
        piecewise_constant=None,
        linear_ramp_to_constant=SimpleNamespace(learning_rate=2.0, num_ramp_steps=4),
        linear_ramp_to_cosine=None,
    )
    assert compute_lr(plain, 1) == 0.5


def test_compute_lr_without_a_schedule_raises():
    unset = SimpleNamespace(
        constant=None, piecewise_constant=None, linear_ramp_to_constant=None, linear_ramp_to_cosine=None
    )
    with pytest.raises(ValueError, match="no learning-rate schedule"):
        compute_lr(unset, 0)


def test_schedules_module_imports_without_pydantic():
    code = "import sys, recap_kernels; recap_kernels.compute_lr; assert 'pydantic' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _optimizer(num_groups):
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(num_groups)]
    return torch.optim.SGD([{"params": [p]} for p in params], lr=123.0)


def test_scheduler_sets_each_group_along_its_own_schedule():
    configs = [RAMP, PIECEWISE, COSINE]
    optimizer = _optimizer(3)
    scheduler = RecapLRScheduler(optimizer, configs)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 1.0, 0.0]
    for _ in range(25):
        optimizer.step()
        scheduler.step()
    assert scheduler.last_epoch == 25
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.0025, 0.1, 0.0025])
    assert scheduler.get_last_lr() == [compute_lr(cfg, 25) for cfg in configs]


def test_scheduler_needs_one_config_per_group():
    with pytest.raises(ValueError, match="2 learning-rate configs for 3 param groups"):
        RecapLRScheduler(_optimizer(3), [CONSTANT, RAMP])


def test_scheduler_state_dict_is_plain_data_and_resumes():
    optimizer = _optimizer(2)
    scheduler = RecapLRScheduler(optimizer, [RAMP, COSINE])
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert "lr_configs" not in checkpoint["scheduler"]

    resumed_optimizer = _optimizer(2)
    resumed = RecapLRScheduler(resumed_optimizer, [RAMP, COSINE])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["scheduler"])
    assert resumed.lr_configs == [RAMP, COSINE]
    resumed_optimizer.step()
    resumed.step()
    assert resumed.last_epoch == 8
    assert [g["lr"] for g in resumed_optimizer.param_groups] == pytest.approx([0.0008, 0.0008])
