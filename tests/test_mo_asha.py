"""MO-ASHA: the promote-or-stop rule on hand-made curves, as pure logic and as a Ray Tune scheduler
driving real trials on a real local Ray."""

from __future__ import annotations

import os

import pytest
from ray_head import ray_head

from afm_ray.search.mo_asha import RungLadder, promoted, rank_positions, rung_milestones

MAX2 = ("max", "max")


def test_rungs_sit_at_grace_times_powers_of_the_reduction_factor_below_the_last_epoch():
    assert rung_milestones(1, 3, 5) == [1, 3]
    assert rung_milestones(1, 2, 5) == [1, 2, 4]
    assert rung_milestones(2, 2, 16) == [2, 4, 8]
    assert rung_milestones(1, 3, 1) == []
    with pytest.raises(ValueError):
        rung_milestones(0, 3, 5)
    with pytest.raises(ValueError):
        rung_milestones(1, 1, 5)


def test_the_top_third_of_a_rung_is_exactly_its_non_dominated_trials():
    # Three mutually non-dominated trials and six dominated ones: with rf 3, top 3 of 9.
    front = [(0.95, 0.30), (0.80, 0.60), (0.60, 0.70)]
    dominated = [(0.90, 0.25), (0.70, 0.50), (0.55, 0.65), (0.50, 0.20), (0.40, 0.10), (0.79, 0.59)]
    keep = promoted(front + dominated, MAX2, 3)
    assert keep.tolist() == [True] * 3 + [False] * 6


def test_within_a_layer_crowding_breaks_ties_and_modes_are_respected():
    # One layer of four (clean max, latency min): the two ends are boundary points (infinite
    # crowding), so with rf 2 (two places) they are the ones kept.
    layer = [(0.9, 5.0), (0.8, 4.0), (0.79, 3.9), (0.5, 1.0)]
    assert promoted(layer, ("max", "min"), 2).tolist() == [True, False, False, True]
    # Equal rank, equal position: both ends tie at 0; the lonelier middle point comes next.
    assert rank_positions(layer, ("max", "min")).tolist() == [0, 3, 2, 0]
    # A duplicate adds no spread: it ranks behind its first copy.
    assert rank_positions([(0.9, 0.5), (0.9, 0.5), (0.1, 0.1)], MAX2).tolist() == [0, 1, 2]


def test_ladder_promotes_exactly_the_non_dominated_trials_as_they_arrive():
    """Asynchronous: each trial is ranked among those recorded at the rung when it gets there."""
    ladder = RungLadder(MAX2, grace_period=1, reduction_factor=2, max_t=2)
    arrivals = {
        "a": (0.90, 0.30),  # first at the rung: nothing to compare with, continues
        "b": (0.50, 0.70),  # non-dominated with a
        "c": (0.60, 0.25),  # dominated by a: layer 2 of 3, position 2 >= 3/2
        "d": (0.40, 0.60),  # dominated by b: position 2 of 4 >= 4/2
        "e": (0.95, 0.10),  # non-dominated: layer 1 holds a, b, e; positions 0-2 < 5/2
    }
    decisions = {t: ladder.on_result(t, 1, v) for t, v in arrivals.items()}
    assert decisions == {"a": True, "b": True, "c": False, "d": False, "e": True}
    # Epochs before the first rung, a repeated report of a rung, and the last epoch never stop.
    assert RungLadder(MAX2, grace_period=2, reduction_factor=2, max_t=4).on_result("x", 1, (0.0, 0.0))
    assert ladder.on_result("c", 1, (0.0, 0.0)) is True
    assert ladder.on_result("a", 2, (0.1, 0.1)) is True
    assert ladder.on_result("z", 1, (float("nan"), 0.5)) is True


def test_a_trial_is_judged_at_the_highest_rung_it_reached():
    ladder = RungLadder(MAX2, grace_period=1, reduction_factor=2, max_t=8)  # rungs 1, 2, 4
    assert ladder.milestones == [1, 2, 4]
    assert ladder.on_result("a", 4, (0.9, 0.9))  # jumps straight to rung 4 (e.g. a resumed trial)
    assert "a" in ladder.recorded[4] and "a" not in ladder.recorded[1]
    assert not ladder.on_result("b", 4, (0.1, 0.1))


def test_a_margin_keeps_trials_no_one_leads_by_the_margin_in_every_objective():
    # rf 3 over six trials: the two non-dominated ones hold the two places.
    values = [(0.95, 0.60), (0.90, 0.70), (0.80, 0.50), (0.94, 0.58), (0.70, 0.30), (0.93, 0.45)]
    assert promoted(values, MAX2, 3).tolist() == [True, True, False, False, False, False]
    assert promoted(values, MAX2, 3, margin=0.0).tolist() == [True, True, False, False, False, False]
    # Margin 0.03: (0.94, 0.58) and (0.93, 0.45) trail (0.95, 0.60) by less than 0.03 in clean, so no
    # trial leads them by the margin in both objectives and they go on; (0.80, 0.50) and
    # (0.70, 0.30) trail by more than 0.03 in both and stop.
    assert promoted(values, MAX2, 3, margin=0.03).tolist() == [True, True, False, True, False, True]
    # A margin below every lead changes nothing.
    assert promoted(values, MAX2, 3, margin=0.005).tolist() == [True, True, False, False, False, False]
    with pytest.raises(ValueError):
        promoted(values, MAX2, 3, margin=-0.01)


def test_ladder_with_a_margin_lets_the_high_clean_slow_starter_through_a_rung():
    """The case the margin exists for: at the rung a trial with the best clean accuracy within
    noise but low early robustness ranks outside the top third; without a margin it stops."""
    arrivals = [("a", (0.95, 0.60)), ("b", (0.90, 0.70)), ("c", (0.80, 0.50)), ("d", (0.85, 0.55))]
    corner = (0.94, 0.30)  # clean within 0.01 of the best, PGD far below
    plain = RungLadder(MAX2, grace_period=1, reduction_factor=3, max_t=3)
    margin = RungLadder(MAX2, grace_period=1, reduction_factor=3, max_t=3, margin=0.02)
    for ladder in (plain, margin):
        for trial, v in arrivals:
            ladder.on_result(trial, 1, v)
    assert plain.on_result("corner", 1, corner) is False
    assert margin.on_result("corner", 1, corner) is True
    assert margin.on_result("poor", 1, (0.90, 0.30)) is False  # led by 0.05 and 0.30 by (0.95, 0.60)
    with pytest.raises(ValueError):
        RungLadder(MAX2, grace_period=1, reduction_factor=3, max_t=3, margin=-1.0)


def test_a_spaces_margin_reaches_the_tune_schedulers_ladder():
    from afm_ray.names import PER_EPOCH_METRICS
    from afm_ray.search.specs import SchedulerSpec
    from afm_ray.sweep.schedulers import build_scheduler

    scheduler = build_scheduler(SchedulerSpec("mo_asha", PER_EPOCH_METRICS, margin=0.03), epochs=5)
    assert scheduler.ladder.margin == 0.03 and scheduler.ladder.milestones == [1, 3]


@pytest.mark.slow
def test_tune_scheduler_stops_exactly_the_dominated_trials_on_a_real_ray(tmp_path, monkeypatch):
    """Real Ray Tune: five trials report hand-made validation curves one after another; MO-ASHA
    (rf 2, a rung at epoch 1) stops exactly the two that are dominated when they reach it."""
    import ray
    from ray import tune

    from afm_ray.sweep.schedulers import MOASHAScheduler

    curves = [(0.90, 0.30), (0.50, 0.70), (0.60, 0.25), (0.40, 0.60), (0.95, 0.10)]

    def trainable(config):
        clean, pgd = config["curve"]
        for epoch in (1, 2, 3):
            tune.report({"epoch": epoch, "val/clean_acc": clean, "val/pgd10_acc": pgd})

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # this process is the head's only client
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with ray_head(dict(os.environ), num_cpus=1) as head:
        ray.init(address=head["gcs"], log_to_driver=False)
        try:
            scheduler = MOASHAScheduler(
                ["val/clean_acc", "val/pgd10_acc"], ["max", "max"], max_t=3, grace_period=1, reduction_factor=2
            )
            tuner = tune.Tuner(
                tune.with_resources(trainable, {"CPU": 1}),
                param_space={"curve": tune.grid_search(curves)},
                tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1),
                run_config=tune.RunConfig(storage_path=str(tmp_path), name="moasha", verbose=0),
            )
            results = tuner.fit()
        finally:
            ray.shutdown()
    last_epoch = {tuple(r.config["curve"]): r.metrics["epoch"] for r in results}
    assert last_epoch == {curves[0]: 3, curves[1]: 3, curves[2]: 1, curves[3]: 1, curves[4]: 3}
