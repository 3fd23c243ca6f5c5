"""Time to target measured honestly: sustained vs first touch, seed aggregation, early cuts, the scale guard."""
import json
import math
import os

import numpy as np
import pytest

from ringmaster_kernels.runtime import experiments as ex
from ringmaster_kernels.runtime.metrics import aggregate, band, cannot_beat, curve_metrics, resample, tail_median, time_to
from ringmaster_kernels.runtime.tuned import TunedValues, scale_of

T = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


def test_touch_and_leave_is_a_first_hit_not_a_sustained_time():
    values = [9, 1, 9, 9, 9, 9, 9, 9]
    m = curve_metrics(T, values, target=2, horizon=7)
    assert m["first_hit"] == 1.0 and m["time_to_target"] is None and m["final"] == 9


def test_stay_gives_the_start_of_the_last_run_below():
    values = [9, 1, 9, 1, 1, 1, 1, 1]
    m = curve_metrics(T, values, target=2, horizon=7)
    assert m["first_hit"] == 1.0 and m["time_to_target"] == 3.0 and m["tail_median"] == 1


def test_never_and_always():
    assert time_to(T, [9] * 8, 2) == (None, None)
    assert time_to(T, [1] * 8, 2) == (0.0, 0.0)
    assert time_to(T, [9, 1, 1, 1, 1, 1, 1, math.nan], 2) == (1.0, None)  # NaN (a diverged run) is above


def test_tail_median_covers_the_last_quarter_with_the_value_in_effect():
    # window [6, 8]: 5 is in effect at 6 (measured at 5.5), then 1 and 3
    assert tail_median([0, 5.5, 6.5, 7.5], [100, 5, 1, 3], horizon=8) == 3
    with pytest.raises(ValueError, match="equal length"):
        tail_median([0, 1], [1], horizon=2)


def test_aggregate_median_and_spread_count_unreached_seeds_as_infinite():
    recs = [{"time_to_target": t, "final": f} for t, f in [(10.0, 1.0), (None, 3.0), (30.0, 2.0), (20.0, 5.0), (None, 4.0)]]
    agg = aggregate(recs, keys=("time_to_target", "final"))
    assert agg["final"] == {"median": 3.0, "q25": 2.0, "q75": 4.0, "min": 1.0, "max": 5.0, "reached": 5, "seeds": 5}
    t = agg["time_to_target"]
    assert t["median"] == 30.0 and t["min"] == 10.0 and t["max"] is None and t["reached"] == 3
    # three of five never reached: the median time is "not reached"
    assert aggregate(recs[:2] + [{"time_to_target": None, "final": 0.0}], keys=("time_to_target",))["time_to_target"]["median"] is None
    with pytest.raises(ValueError, match="records"):
        aggregate([])


def test_band_is_the_pointwise_median_min_max_of_step_curves():
    a = ([0.0, 2.0], [4.0, 1.0])
    b = ([0.0, 1.0], [6.0, 2.0])
    c = ([0.0, 3.0], [5.0, 3.0])
    grid, med, lo, hi = band([a, b, c], horizon=4.0, points=5)
    assert grid.tolist() == [0, 1, 2, 3, 4]
    assert med.tolist() == [5, 4, 2, 2, 2] and lo.tolist() == [4, 2, 1, 1, 1] and hi.tolist() == [6, 5, 5, 3, 3]
    assert resample(*a, np.array([1.99, 2.0])).tolist() == [4.0, 1.0]


def test_cannot_beat_fires_only_above_the_target_after_the_best_time():
    stop = cannot_beat(best=10.0, target=1.0)
    assert not stop(9.0, 5.0) and not stop(11.0, 0.5) and stop(10.0, 1.5) and stop(12.0, math.nan)


def test_tuning_cut_rows_are_not_not_reached_and_could_not_have_won():
    exp = ex.QuadraticExperiment(workers=16, dim=16, horizon=100, target=1e-1)
    grid = [{"lr": lr, "threshold": 2} for lr in (0.2, 1.0, 5.0)]
    # the anchor (lr 0.2) runs first and sets the bar; lr 1 and 5 touch the target early, then leave it
    res = ex.tune(exp, ("ringmaster",), seed=0, grids={"ringmaster": grid}, anchors={"ringmaster": grid[0]})["ringmaster"]
    rows = {r["params"]["lr"]: r for r in res["grid"]}
    best = rows[res["best"]["lr"]]
    assert best["cut_off"] is None and best["time_to_target"] is not None
    cut = [r for r in rows.values() if r["cut_off"] is not None]
    assert cut, "some candidate should have been cut off at this scale"
    for r in cut:
        # run uncut: its sustained time is indeed later than both its cut time and the winner's
        full = exp.summary(exp.run("ringmaster", r["params"], seed=0))
        assert full["cut_off"] is None
        assert full["time_to_target"] is None or full["time_to_target"] > max(r["cut_off"], best["time_to_target"])


def test_scale_guard_hands_out_values_only_at_their_scale():
    here = ex.QuadraticExperiment(workers=8, dim=8, horizon=10)
    stored = TunedValues(scale=scale_of(here), params={"sync": {"lr": 0.2}}, tune_seed=0, command="cmd")
    assert stored.for_experiment(here, ("sync",)) == {"sync": {"lr": 0.2}}
    for change in ({"workers": 9}, {"dim": 16}, {"horizon": 20.0}, {"noise": 0.1}, {"time_model": "sqrt"},
                   {"heterogeneity": 2.0}, {"outliers": ((0, 2.0),)}):
        other = ex.replace(here, **change)
        (key,) = change
        with pytest.raises(ValueError, match=f"{key}: tuned at .*; they were tuned at \\[workers=8, dim=8"):
            stored.for_experiment(other, ("sync",))
    with pytest.raises(ValueError, match="no tuned values for \\['async'\\]"):
        stored.for_experiment(here, ("async",))
    # the package's own values carry the paper's scale
    assert ex.TUNED.scale["workers"] == 6174 and ex.TUNED.scale["dim"] == 1729 and ex.TUNED.scale["horizon"] == 2000


def test_stored_values_are_what_the_recorded_tuning_chose_at_that_scale():
    # benchmarks/simulator/paper_quadratic.json is the run that chose them (RESULTS.md quotes it)
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "simulator", "paper_quadratic.json")
    with open(path) as f:
        recorded = json.load(f)
    assert recorded["scale"] == json.loads(json.dumps(ex.TUNED.scale))
    assert recorded["tune_seed"] == ex.TUNED.tune_seed and recorded["tune_seed"] not in recorded["seeds"]
    assert {m: t["best"] for m, t in recorded["tuning"].items()} == ex.TUNED.params


def test_speedup_is_exact_a_lower_bound_or_missing():
    rec = lambda t, cut=None: {"time_to_target": t, "cut_off": cut}  # noqa: E731
    assert ex.speedup(rec(10.0), rec(30.0), horizon=100) == {"value": 3.0, "bound": "exact"}
    # the other never sustained the target: its time exceeds the horizon (or the cut time)
    assert ex.speedup(rec(10.0), rec(None), horizon=100) == {"value": 10.0, "bound": "at_least"}
    assert ex.speedup(rec(10.0), rec(None, cut=40.0), horizon=100) == {"value": 4.0, "bound": "at_least"}
    assert ex.speedup(rec(None), rec(30.0), horizon=100) == {"value": None, "bound": "missing"}


def test_refine_grid_takes_half_steps_around_the_best_and_keeps_flags():
    grid = ex.refine_grid({"lr": 0.2, "threshold": 2, "stops": False})
    lrs = sorted({p["lr"] for p in grid})
    assert lrs == pytest.approx([0.2 / 5**0.5, 0.2, 0.2 * 5**0.5])
    assert sorted({p["threshold"] for p in grid}) == [1, 2, 3]
    assert all(p["stops"] is False for p in grid)
    assert sorted({p["threshold"] for p in ex.refine_grid({"lr": 1.0, "threshold": 32})}) == [16, 32]
    assert [p["lr"] for p in ex.refine_grid({"lr": 1.0})] == pytest.approx([5**-0.5, 1.0, 5**0.5])


def test_refined_tuning_runs_each_new_point_once_and_can_only_improve():
    exp = ex.QuadraticExperiment(workers=16, dim=16, horizon=100, target=1e-1)
    grid = [{"lr": lr, "threshold": 2} for lr in (0.2, 1.0)]
    coarse = ex.tune(exp, ("ringmaster",), seed=0, grids={"ringmaster": grid})["ringmaster"]
    fine = ex.tune(exp, ("ringmaster",), seed=0, grids={"ringmaster": grid}, refine=True)["ringmaster"]
    params = [r["params"] for r in fine["grid"]]
    assert len(params) == len({(round(p["lr"], 12), p["threshold"]) for p in params})  # no point twice
    assert len(params) > len(grid)
    expected = {(round(p["lr"], 12), p["threshold"]) for p in ex.refine_grid(coarse["best"])} | \
        {(round(p["lr"], 12), p["threshold"]) for p in grid}
    assert {(round(p["lr"], 12), p["threshold"]) for p in params} == expected
    score = {(round(r["params"]["lr"], 12), r["params"]["threshold"]): ex.score(r) for r in fine["grid"]}
    best_fine = score[(round(fine["best"]["lr"], 12), fine["best"]["threshold"])]
    assert best_fine <= score[(round(coarse["best"]["lr"], 12), coarse["best"]["threshold"])]
    assert best_fine == min(score.values())
