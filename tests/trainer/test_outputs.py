"""The loss curve a version's manifest keeps (trainer/outputs.py loss_curve)."""

from __future__ import annotations

import itertools

from loradock.trainer.outputs import loss_curve


def test_a_long_run_is_thinned_evenly_and_keeps_its_last_point():
    records = [{"step": s, "loss": 10.0 / s} for s in range(1, 2001)]
    records += [{"step": s, "eval_loss": 1.0 / s} for s in (500, 1000, 2000)]
    curve = loss_curve(records, max_points=100)
    steps = [s for s, _ in curve["loss"]]
    assert len(steps) == 100 and steps[0] == 1 and steps[-1] == 2000
    assert sorted(set(steps)) == steps  # in order, no repeats
    assert all(b - a <= 40 for a, b in itertools.pairwise(steps))  # no gap wider than 2x the stride
    assert curve["loss"][-1] == [2000, 10.0 / 2000]
    assert curve["eval_loss"] == [[500, 1 / 500], [1000, 1 / 1000], [2000, 1 / 2000]]  # short: kept whole


def test_a_stride_that_lands_on_the_last_step_keeps_it_once():
    points = loss_curve([{"step": s, "loss": 1.0} for s in range(1, 1202)], max_points=500)["loss"]
    steps = [s for s, _ in points]
    assert steps[-1] == 1201 and len(steps) == len(set(steps)) <= 500


def test_a_run_without_eval_has_no_eval_series_and_overflowed_steps_are_left_out():
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 1.5}]
    assert loss_curve(records) == {"loss": [[1, 2.0], [3, 1.5]]}
    assert loss_curve([]) == {}
