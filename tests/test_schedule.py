"""The learning-rate schedule: a pure function of the step, with warmup and cosine / linear / constant decay."""

from __future__ import annotations

import itertools
import math

import pytest

from hpcds.spec import TrainingSpec
from hpcds.train.schedule import lr_at, lr_for_spec


def test_warmup_rises_linearly_to_the_peak():
    rates = [lr_at(s, lr=1.0, min_lr=0.0, warmup_steps=4, max_steps=20) for s in range(5)]
    assert rates == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(r > 0 for r in rates)  # step 0 never trains with lr 0


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_decay_ends_at_min_lr_on_the_last_step_and_stays(decay):
    kwargs = dict(lr=3e-3, min_lr=3e-4, warmup_steps=10, max_steps=100, decay=decay)
    assert lr_at(10, **kwargs) == pytest.approx(3e-3)
    assert lr_at(99, **kwargs) == pytest.approx(3e-4)
    assert lr_at(150, **kwargs) == pytest.approx(3e-4)
    rates = [lr_at(s, **kwargs) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(rates))


def test_cosine_midpoint_and_linear_midpoint():
    assert lr_at(50, lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=101) == pytest.approx(0.5)
    assert lr_at(25, lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=101) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 4))
    )
    assert lr_at(25, lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=101, decay="linear") == pytest.approx(0.75)


def test_constant_and_degenerate_schedules():
    assert lr_at(7, lr=0.1, min_lr=0.0, warmup_steps=2, max_steps=10, decay="constant") == 0.1
    assert lr_at(0, lr=0.1, min_lr=0.0, warmup_steps=0, max_steps=1) == 0.1  # one step: no room to decay
    with pytest.raises(ValueError, match="unknown decay"):
        lr_at(0, lr=0.1, min_lr=0.0, warmup_steps=0, max_steps=10, decay="step")
    with pytest.raises(ValueError, match="step must be"):
        lr_at(-1, lr=0.1, min_lr=0.0, warmup_steps=0, max_steps=10)


def test_spec_wrapper_uses_the_training_fields():
    training = TrainingSpec(lr=2e-3, min_lr=1e-4, warmup_steps=5, max_steps=50, decay="linear")
    assert lr_for_spec(30, training) == lr_at(30, lr=2e-3, min_lr=1e-4, warmup_steps=5, max_steps=50, decay="linear")


def test_same_step_same_rate_whatever_came_before():
    # What exact resume needs: no hidden state, the rate of step s depends on s alone.
    kwargs = dict(lr=1e-3, min_lr=0.0, warmup_steps=3, max_steps=40)
    first = [lr_at(s, **kwargs) for s in range(40)]
    resumed = [lr_at(s, **kwargs) for s in range(17, 40)]
    assert first[17:] == resumed
