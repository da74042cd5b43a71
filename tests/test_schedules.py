"""Learning-rate schedules from the config (constant, step, cosine, linear warm-up) and their Keras objects."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ablations.config import ConfigError, OptimizerConfig, ScheduleConfig, parse_experiment


def rates(cfg: OptimizerConfig, total: int, steps: list[int]) -> list[float]:
    from ablations.factories import make_optimizer

    opt = make_optimizer(cfg, total_steps=total)
    lr = opt._learning_rate  # the schedule object (or a constant)
    return [float(lr(s)) if callable(lr) else float(lr) for s in steps]


def test_constant_is_the_default():
    cfg = OptimizerConfig(learning_rate=0.1)
    assert cfg.schedule.name == "constant"
    assert rates(cfg, 100, [0, 50, 99]) == pytest.approx([0.1] * 3)


def test_step_schedule_divides_at_milestones():
    cfg = OptimizerConfig(learning_rate=0.1, schedule={"name": "step", "milestones": [0.5, 0.75], "gamma": 0.1})
    got = rates(cfg, 200, [0, 99, 100, 149, 150, 199])
    assert got == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rel=1e-5)


def test_cosine_schedule_and_string_shorthand():
    cfg = OptimizerConfig(learning_rate=0.2, schedule="cosine")
    assert cfg.schedule == ScheduleConfig(name="cosine")
    total = 100
    got = rates(cfg, total, [0, 25, 50, 100])
    want = [0.2 * 0.5 * (1 + math.cos(math.pi * s / total)) for s in (0, 25, 50, 100)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    floor = OptimizerConfig(learning_rate=0.2, schedule={"name": "cosine", "min_fraction": 0.1})
    assert rates(floor, total, [100])[0] == pytest.approx(0.02, rel=1e-5)


def test_linear_warmup_then_schedule():
    cfg = OptimizerConfig(learning_rate=0.1, schedule={"name": "constant", "warmup_steps": 10})
    got = rates(cfg, 100, [0, 4, 9, 10, 50])
    assert got == pytest.approx([0.01, 0.05, 0.1, 0.1, 0.1], rel=1e-5)
    cos = OptimizerConfig(learning_rate=0.1, schedule={"name": "cosine", "warmup_steps": 20})
    got = rates(cos, 120, [19, 20, 70, 120])  # cosine over the 100 steps after the warm-up
    np.testing.assert_allclose(got, [0.1, 0.1, 0.05, 0.0], rtol=1e-5, atol=1e-7)


def test_warmup_schedule_serialises():
    import keras

    from ablations.factories import LinearWarmup

    sched = LinearWarmup(keras.optimizers.schedules.CosineDecay(0.1, 50), 0.1, 5)
    again = LinearWarmup.from_config(sched.get_config())
    for s in (0, 3, 5, 30):
        assert float(again(s)) == pytest.approx(float(sched(s)))


def test_bad_schedules_fail_clearly():
    with pytest.raises(ConfigError, match="train.optimizer.schedule.name"):
        parse_experiment({"name": "x", "train": {"optimizer": {"schedule": "linear"}}})
    with pytest.raises(ConfigError, match="milestones must be increasing fractions"):
        parse_experiment({"name": "x", "train": {"optimizer": {"schedule": {"name": "step", "milestones": [0.8, 0.2]}}}})
    with pytest.raises(ConfigError, match="unknown key 'train.optimizer.schedule.warmup'"):
        parse_experiment({"name": "x", "train": {"optimizer": {"schedule": {"warmup": 3}}}})
    exp = parse_experiment({"name": "x", "grid": {"train.optimizer.schedule": ["constant", "cosine"]}})
    assert [a.config.train.optimizer.schedule.name for a in exp.arms()] == ["constant", "cosine"]
    assert [a.id for a in exp.arms()] == ["schedule=constant,seed=0", "schedule=cosine,seed=0"]
    from ablations.factories import make_schedule

    with pytest.raises(ValueError, match="needs the run's total number of steps"):
        make_schedule(ScheduleConfig(name="step"), 0.1, None)
