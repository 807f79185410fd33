"""benchmarks/rules.py judges a stopping rule by each concept's saturation step: planted trajectories whose
loss settles and whose identity saturates at known steps."""

import csv
import json
import math

import numpy as np
import pytest

import benchmarks.rules as rules
from benchmarks.personalization.saturation import oracle_saturation


def planted(concept, tau, saturation, half="selection", budget=1000, method="dreambooth_lora"):
    """Loss exp(-t / tau) (every step), identity rising linearly to a plateau at ``saturation``."""
    steps = list(range(0, budget + 1, 50))
    identity = [0.4 + 0.4 * min(s, saturation) / saturation for s in steps]
    losses = [0.02 + 0.01 * math.exp(-t / tau) for t in range(1, budget + 1)]
    return rules.Trajectory(method, concept, half, 1.0, budget, losses, steps, identity,
                            oracle_saturation(steps, identity, noise_sd=0.01), [0.1] * budget, 0.05)


def test_identity_between_checks_is_interpolated_and_time_counts_evaluations():
    t = planted("a", tau=50, saturation=400)
    assert t.identity_at(425) == pytest.approx(0.8) and t.identity_at(200) == pytest.approx(0.6)
    assert t.seconds_to(100, 10) == pytest.approx(100 * 0.1 + 10 * 0.05)


@pytest.mark.parametrize("tau, saturation", [(60, 200), (100, 300), (200, 600)])
def test_the_shipped_auto_rule_stops_near_saturation_when_identity_tracks_the_loss(tau, saturation):
    # identity saturates at 3 tau; the rule stops near 3 tau: stop / saturation within [0.8, 1.5]
    row = rules.judge(planted("a", tau, saturation), rules.issue12_candidates()[rules.AUTO])
    assert abs(row["saturation_step"] - saturation) <= 50 and 0.8 <= row["ratio"] <= 1.5
    assert row["speedup"] > 1 and row["regret"] == pytest.approx(0)


def test_a_rule_that_never_fires_is_judged_at_the_budget():
    never = lambda t: (None, 0)  # noqa: E731
    row = rules.judge(planted("a", 50, 400), never)
    assert row["stop"] is None and row["ratio"] == pytest.approx(1000 / 400) and row["identity_change"] == 0
    assert row["speedup"] == pytest.approx(1.0)


def test_choose_prefers_the_closest_rule_that_is_non_inferior():
    trajectories = [planted(f"c{i}", tau, 4 * tau) for i, tau in enumerate([30, 40, 50, 60, 70, 80])]
    early = lambda t: (50, 1)  # noqa: E731  far too early: identity drops on every concept
    late = lambda t: (t.budget, 1)  # noqa: E731  safe but far past saturation
    cells = rules.compare(trajectories, {"paper": late, "early": early, "late": late, rules.AUTO: rules.issue12_candidates()[rules.AUTO]})
    by_rule = {c["rule"]: c for c in cells}
    assert by_rule["early"]["noninferior"] == "no" and by_rule["early"]["ci_high"] < -by_rule["early"]["margin"]
    assert by_rule["late"]["noninferior"] == "yes" and by_rule["late"]["too_late"] > 0.5
    assert by_rule["late"]["step_speedup_median"] == 1 and by_rule["late"]["saving_captured_median"] == 0
    assert rules.choose(cells) == rules.AUTO
    assert rules.meets_target(by_rule[rules.AUTO]) and not rules.meets_target(by_rule["late"])


@pytest.mark.parametrize("changes, decision", [
    ([-0.001, 0.002, 0.0, -0.003, 0.001, 0.002], "yes"),  # loses nothing: CI well inside the margin
    ([-0.08, -0.07, -0.09, -0.085, -0.075, -0.08], "no"),  # loses 0.08 on every concept
    ([-0.06, 0.01, -0.04, 0.0, -0.05, 0.005], "undecided"),  # the CI straddles -0.02
])
def test_a_cell_keeps_quality_only_when_its_ci_clears_the_margin(changes, decision):
    trajectories = [planted(f"c{i}", 50, 250) for i in range(len(changes))]
    for t, change in zip(trajectories, changes):  # the stop at step 500 reads identity 0.8 + change
        t.check_identity = [v + (change if s == 500 else 0.0) for s, v in zip(t.check_steps, t.check_identity)]
    cell = rules.summarize([rules.judge(t, lambda t: (500, 50)) for t in trajectories])
    assert cell["noninferior"] == decision and cell["margin"] == 0.02
    assert cell["mean_delta"] == pytest.approx(np.mean(changes))


def test_still_rising_concepts_are_censored_at_the_budget():
    t = planted("a", 50, 400)
    t.saturation = oracle_saturation(t.check_steps, [0.4 + 0.3 * s / 1000 for s in t.check_steps], noise_sd=0.01)
    assert t.saturation.status == "still rising"
    row = rules.judge(t, lambda t: (500, 50))
    assert row["ratio"] == pytest.approx(0.5) and row["saving_captured"] == 0  # stop / budget; nothing to save
    assert rules.summarize([row])["too_early"] == 1


def settling_stop(tau, multiple, level, lag=40, floor=200):
    """Where the settling-time rule should stop on exp(-t / tau): the first step n with n >= multiple * (T(n) + lag),
    T(n) the step at which the loss covered ``level`` of its drop so far; lag: the 5-evaluation smoothing's delay
    (2 strides to the window's centre, 2 more to its end)."""
    return next(n for n in range(floor, 10_000)
                if n >= multiple * (-tau * math.log(1 - level * (1 - math.exp(-n / tau))) + lag))


@pytest.mark.parametrize("level", [0.8, 0.9])
@pytest.mark.parametrize("multiple", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("tau", [60, 120, 200])
def test_the_settling_time_rule_stops_at_a_multiple_of_the_time_the_loss_took_to_settle(tau, multiple, level):
    stop, evaluations = rules.settling_time(multiple, level)(planted("a", tau, 5 * tau))
    expected = settling_stop(tau, multiple, level)
    if expected > 1000:
        assert stop is None, "it would stop after the budget"
    else:  # a stride of 10 steps rounds the crossing and the stop
        assert stop == 10 * evaluations and abs(stop - expected) <= 20 * multiple


@pytest.mark.parametrize("trace", [
    [1.0 - t / 1000 for t in range(1, 1001)],  # still falling at the budget
    [0.02 + 0.01 * t / 1000 for t in range(1, 1001)],  # rising: nothing to settle
    [0.02] * 1000,  # constant
])
def test_the_settling_time_rule_never_stops_a_loss_that_has_not_settled(trace):
    t = planted("a", 50, 250)
    t.losses = trace
    assert rules.settling_time(1.5, 0.8)(t)[0] is None


# ---- issue 23's candidates: per-example losses, timestep bands, update diagnostics --------------------------------


def with_signals(t, taus, timesteps, budget=1000, pflug_turns=None, displacement_tau=None):
    """Give a planted trajectory format-3 signals: example e's loss exp(-t / taus[e]) (plus a floor; tau 0: flat, with
    a little noise), the updates' successive inner products positive until ``pflug_turns`` and negative after,
    |w_t - w_0|^2 = 1 - exp(-t / tau)."""
    steps = np.arange(1, budget + 1)[:, None]
    taus = np.asarray(taus, dtype=float)[None, :]
    falling = 0.1 + np.exp(-steps / np.where(taus > 0, taus, 1.0))
    t.per_example = np.where(taus > 0, falling, 1.0 + 0.001 * np.sin(2.1 * steps))
    t.timesteps = np.asarray(timesteps, dtype=float)
    turns = pflug_turns or budget + 1
    t.dot_previous = [None] + [1.0 if s < turns else -3.0 for s in range(2, budget + 1)]
    t.displacement_sq = list(1 - np.exp(-np.arange(1, budget + 1) / (displacement_tau or 50)))
    return t


@pytest.mark.parametrize("taus, hold, skip", [
    ([20, 20, 20, 20], 200, 200),  # every band falls: B and Bf agree
    ([20, 20, 20, 0], None, 200),  # the high-noise band never falls: B waits for it forever, Bf does not
    ([0, 0, 0, 0], None, None),  # nothing falls: neither stops
    ([20, 20, 20, 150], 560, 560),  # a band that falls slowly is no flat band: both wait for it
])
def test_a_band_that_never_falls_holds_b_but_not_bf(taus, hold, skip):
    t = with_signals(planted("a", 50, 250), taus, timesteps=[100, 300, 600, 900])
    assert rules.band_settling(2.0, 0.8)(t)[0] == hold
    assert rules.band_settling(2.0, 0.8, flat_bands="skip")(t)[0] == skip


def test_normalized_examples_weigh_a_small_loss_like_a_large_one():
    t = with_signals(planted("a", 50, 250), taus=[20, 20, 20, 20], timesteps=[100, 300, 600, 900])
    t.per_example[:, 0] *= 100  # one example's loss is 100x the others': normalising removes the scale
    values = rules.normalized_examples(t, 10)
    assert values.shape == (100, 4) and np.allclose(values[0], 1.0) and np.allclose(values[:, 0], values[:, 1])


@pytest.mark.parametrize("taus, slowest", [
    ([20, 20, 20, 20], 20),
    ([20, 20, 20, 150], 150),  # the highest-timestep example settles last: B waits for it, N does not
])
def test_bands_stop_when_the_slowest_band_has_settled(taus, slowest):
    t = with_signals(planted("a", 50, 250), taus, timesteps=[100, 300, 600, 900])
    band_stop, _ = rules.band_settling(2.0, 0.8)(t)
    alone = with_signals(planted("b", 50, 250), [slowest] * 4, timesteps=[100, 300, 600, 900])
    assert band_stop == rules.normalized_settling(2.0, 0.8)(alone)[0]
    if slowest > 20:
        assert rules.normalized_settling(2.0, 0.8)(t)[0] < band_stop


@pytest.mark.parametrize("turns, burn_in, min_steps, stop", [
    (None, 0.1, 10, None),  # successive updates always agree: still travelling, never stationary
    (300, 0.1, 10, 366),  # sum from step 100: +200 over steps 100-299, then -3 a step: negative at the 67th, 366
    (50, 0.1, 10, 110),  # negative from the start of the sum at 100: the first step allowed, 100 + 10
])
def test_pflug_stops_once_successive_updates_disagree_on_balance(turns, burn_in, min_steps, stop):
    t = with_signals(planted("a", 50, 250), [20] * 4, [1, 2, 3, 4], pflug_turns=turns)
    assert rules.pflug(burn_in, min_steps)(t) == (stop, 0)


@pytest.mark.parametrize("tau", [80, 120, 160])
def test_the_distance_travelled_settles_at_a_multiple_of_its_time_constant(tau):
    t = with_signals(planted("a", 50, 250), [20] * 4, [1, 2, 3, 4], displacement_tau=tau)
    stop, evaluations = rules.displacement_settling(2.0, 0.8)(t)
    settling = 1.61 * tau  # 1 - exp(-T / tau) = 0.8 at T = tau ln 5; smoothing adds up to 50 steps, the stride 10
    assert evaluations == 0 and 2 * settling <= stop <= 2 * (settling + 50) + 10


def test_a_guard_only_delays_a_stop():
    t = planted("a", 50, 250)
    early, late, never = (lambda t: (100, 10)), (lambda t: (400, 0)), (lambda t: (None, 0))  # noqa: E731
    assert rules.guarded(early, late)(t) == (400, 40) and rules.guarded(late, early)(t)[0] == 400
    assert rules.guarded(early, never)(t) == (None, 10)


@pytest.mark.parametrize("multiple, saturation, stop", [
    (1.5, 300, 450),  # a multiple of the concept's own saturation step
    (2.0, 600, 1000),  # capped at the budget
    (1.25, 0, 1),  # saturated before training: the first step
])
def test_the_oracle_stops_at_a_multiple_of_each_concepts_saturation(multiple, saturation, stop):
    t = planted("a", 50, max(saturation, 1))
    t.saturation = rules.Saturation(saturation, "saturated", 0.8)
    assert rules.oracle_multiple(multiple)(t) == (stop, 0)


@pytest.mark.parametrize("status", ["flat", "still rising"])
def test_the_oracle_never_stops_a_concept_without_a_saturation_step(status):
    t = planted("a", 50, 400)
    t.saturation = rules.Saturation(None, status, None)
    assert rules.oracle_multiple(1.5)(t) == (None, 0)


def test_the_oracle_is_a_reference_never_the_chosen_default():
    """The oracle knows each concept's saturation: it beats every candidate, and is still not chosen."""
    trajectories = [planted(f"c{i}", tau, 4 * tau) for i, tau in enumerate([30, 40, 50, 60, 70, 80])]
    late = lambda t: (900, 1)  # noqa: E731  well after every saturation: safe, saves a little
    cells = rules.compare(trajectories, {"oracle x1.5": rules.oracle_multiple(1.5), "late": late})
    by_rule = {c["rule"]: c for c in cells}
    assert by_rule["oracle x1.5"]["noninferior"] == "yes" and by_rule["oracle x1.5"]["saving_captured_median"] > 0.5
    assert rules.choose_default(cells) == "late"


def _cell(rule, method, noninferior, ci_low, saving, mean_saving=None):
    return {"rule": rule, "half": "selection", "method": method, "lr_scale": 1.0, "noninferior": noninferior,
            "ci_low": ci_low, "saving_captured_median": saving,
            "saving_captured_mean": saving if mean_saving is None else mean_saving}


@pytest.mark.parametrize("cells, chosen", [
    # non-inferior everywhere beats any saving
    ([_cell("safe", "ti", "yes", -0.01, 0.3), _cell("safe", "lora", "yes", -0.015, 0.4),
      _cell("fast", "ti", "yes", -0.01, 0.9), _cell("fast", "lora", "undecided", -0.03, 0.9)], "safe"),
    # none is: the one nearest to non-inferior in its worst cell, not the one that saves most
    ([_cell("careful", "ti", "undecided", -0.025, 0.3), _cell("careful", "lora", "undecided", -0.03, 0.3),
      _cell("aggressive", "ti", "no", -0.08, 0.9), _cell("aggressive", "lora", "undecided", -0.04, 0.9)], "careful"),
    # equally near: the one that saves more
    ([_cell("a", "ti", "undecided", -0.03, 0.3), _cell("b", "ti", "undecided", -0.03, 0.5)], "b"),
    # a rule that stops on few concepts (median saving 0) but is non-inferior everywhere beats one that is not
    ([_cell("rare", "ti", "yes", -0.01, 0.0, 0.1), _cell("rare", "cd", "yes", -0.005, 0.0, 0.05),
      _cell("fast", "ti", "yes", -0.015, 0.6), _cell("fast", "cd", "undecided", -0.03, 0.6)], "rare"),
    # ... and the rarer of two such rules loses to the one that saves more on average
    ([_cell("rare", "ti", "yes", -0.01, 0.0, 0.1), _cell("rarer", "ti", "yes", -0.01, 0.0, 0.02)], "rare"),
])
def test_the_default_is_chosen_for_quality_first_then_saving(cells, chosen):
    assert rules.choose_default(cells) == chosen


def with_method_aware(cells):
    return cells + rules.method_aware_cells(cells)


@pytest.mark.parametrize("cells, chosen", [
    # no single rule is non-inferior everywhere: per method, the paper preset where it is, else that method's best
    ([_cell("paper", "ti", "yes", -0.01, 0.2), _cell("paper", "cd", "no", -0.06, 0.8),
      _cell("a", "ti", "undecided", -0.03, 0.6), _cell("a", "cd", "yes", -0.01, 0.2),
      _cell("b", "ti", "yes", -0.01, 0.1), _cell("b", "cd", "undecided", -0.025, 0.1)], "M ti: paper; cd: a"),
    # a single rule that meets the bar (non-inferior everywhere, 0.6 at 1x) is chosen over M, even if M saves more
    ([_cell("paper", "ti", "yes", -0.01, 0.9), _cell("paper", "cd", "no", -0.06, 0.8),
      _cell("a", "ti", "yes", -0.01, 0.6), _cell("a", "cd", "yes", -0.01, 0.6),
      _cell("c", "ti", "undecided", -0.03, 0.9), _cell("c", "cd", "yes", -0.01, 0.8)], "a"),
    # no single rule meets it: M competes with the safe single rules on saving, and saves more than this one
    ([_cell("paper", "ti", "yes", -0.01, 0.9), _cell("paper", "cd", "no", -0.06, 0.8),
      _cell("a", "ti", "yes", -0.01, 0.1), _cell("a", "cd", "yes", -0.01, 0.1),
      _cell("c", "ti", "undecided", -0.03, 0.9), _cell("c", "cd", "yes", -0.01, 0.5)], "M ti: paper; cd: c"),
    # ... but not more than this one: the single rule (the simpler) stays
    ([_cell("paper", "ti", "yes", -0.01, 0.9), _cell("paper", "cd", "no", -0.06, 0.8),
      _cell("a", "ti", "yes", -0.01, 0.5), _cell("a", "cd", "yes", -0.01, 0.5),
      _cell("c", "ti", "undecided", -0.03, 0.9), _cell("c", "cd", "yes", -0.01, 0.4)], "a"),
    # M is not non-inferior everywhere either (no rule is on cd): the nearest, which M is
    ([_cell("paper", "ti", "yes", -0.01, 0.2), _cell("paper", "cd", "no", -0.06, 0.8),
      _cell("a", "ti", "undecided", -0.03, 0.6), _cell("a", "cd", "undecided", -0.021, 0.2)], "M ti: paper; cd: a"),
    # a method whose only safe rules never stop there takes its nearest stopping rule, not one that never stops
    ([_cell("paper", "ti", "yes", -0.01, 0.2), _cell("paper", "cd", "no", -0.06, 0.8),
      _cell("never", "ti", "yes", 0.0, 0.0), _cell("never", "cd", "yes", 0.0, 0.0),
      _cell("a", "ti", "no", -0.05, 0.6), _cell("a", "cd", "undecided", -0.03, 0.2)], "M ti: paper; cd: a"),
    # per method, the paper preset is one of the candidates: passed over where another safe one saves more
    ([_cell("paper", "ti", "yes", -0.01, 0.2), _cell("paper", "cd", "no", -0.06, 0.8),
      _cell("a", "ti", "undecided", -0.03, 0.6), _cell("a", "cd", "yes", -0.01, 0.2),
      _cell("b", "ti", "yes", -0.015, 0.5), _cell("b", "cd", "undecided", -0.025, 0.1)], "M ti: b; cd: a"),
])
def test_the_method_aware_candidate_competes_only_when_no_single_rule_meets_the_bar(cells, chosen):
    assert rules.choose_default(with_method_aware(cells)) == chosen


def test_a_method_aware_rule_is_reported_on_the_methods_a_held_out_run_has(tmp_path, capsys):
    """--rule "M ..." on a run of one method (the flow model trains LoRA only) reports that method's part."""
    cells = [_cell("paper", "ti", "yes", -0.01, 0.2), _cell("a", "lora", "yes", -0.01, 0.3)]
    composed = rules.compose_method_aware(cells, {"lora": "a"})
    assert [(c["rule"], c["method"]) for c in composed] == [("M lora: a", "lora")]
    with pytest.raises(ValueError, match="not a method-aware rule"):
        rules.parse_method_aware("M nothing")


def test_a_rule_that_never_stops_is_not_a_default_however_safe():
    trajectories = [planted(f"c{i}", tau, 4 * tau) for i, tau in enumerate([30, 40, 50, 60, 70, 80])]
    never, late = (lambda t: (None, 0)), (lambda t: (900, 1))  # noqa: E731
    cells = rules.compare(trajectories, {"never": never, "late": late})
    assert {c["rule"]: c["noninferior"] for c in cells} == {"never": "yes", "late": "yes"}
    assert rules.choose_default(cells) == "late"
    assert rules.choose_default([c for c in cells if c["rule"] == "never"]) is None


@pytest.mark.parametrize("stop, share, expected", [
    ((100, 10), 0.4, (400, 40)),  # fired before 40% of the budget: goes on to it, evaluating at the same stride
    ((600, 60), 0.4, (600, 60)),  # fired after it: unchanged
    ((None, 100), 0.4, (None, 100)),  # never fired: never
])
def test_a_floor_only_delays_an_early_stop(stop, share, expected):
    assert rules.not_before(lambda t: stop, share)(planted("a", 50, 250)) == expected


#: the replayed candidates that the callback can run, with the settings that make it run them
CALLBACK_SETTINGS = {
    "H N level=0.8 x2 from 40%": lambda budget: {"signal": "normalized", "min_steps": math.ceil(0.4 * budget)},
    "B level=0.8 x2": lambda budget: {"signal": "bands"},
    "H B level=0.8 x1.5 from 40%": lambda budget: {"signal": "bands", "threshold": 1.5,
                                                   "min_steps": math.ceil(0.4 * budget)},
    "S level=0.8 x3": lambda budget: {"signal": "loss", "threshold": 3.0},
    # the default's parts (dvar.rules.DEFAULT_RULES): Textual Inversion, DreamBooth-LoRA, Custom Diffusion
    "Bf level=0.8 x1.75": lambda budget: {"signal": "bands", "threshold": 1.75, "flat_bands": "skip"},
    "H B level=0.8 x2 from 50%": lambda budget: {"signal": "bands", "min_steps": math.ceil(0.5 * budget)},
    "S level=0.9 x2": lambda budget: {"signal": "loss", "threshold": 2.0, "level": 0.9},
}


@pytest.mark.parametrize("candidate", list(CALLBACK_SETTINGS))
@pytest.mark.parametrize("taus, budget", [
    ([20, 20, 20, 20], 1000),  # settles early: the floor at 40% of the budget decides (H)
    ([20, 40, 150, 300], 1000),  # the slow examples settle late (440): the rule decides
    ([10, 10, 60, 60], 500),  # fires at 170, held to 200 (H)
    ([300, 20, 20, 20], 1000),  # one example settles last: B waits for its band, N (mean of four) does not
    ([5000, 5000, 5000, 5000], 800),  # still falling at the budget: never
    ([20, 0, 60, 0], 1000),  # two examples never fall: Bf does not wait for a band of them, B does
])
def test_the_replayed_default_candidates_stop_where_the_callback_does(toy_dataset, candidate, taus, budget):
    from types import SimpleNamespace

    import torch
    from diffusers import DDPMScheduler

    from dvar import DVAREarlyStopping

    class Recorded:  # the recorded per-example losses, served to the callback step by step
        step = 1

        def per_example_losses(self, models, batch):
            losses = torch.as_tensor(t.per_example[self.step - 1], dtype=torch.float64)
            return SimpleNamespace(losses=losses, loss=losses.mean())

        def __call__(self, models, batch):
            return self.per_example_losses(models, batch).loss

    objective = Recorded()
    stopper = DVAREarlyStopping(objective=objective, train_dataset=toy_dataset, noise_scheduler=DDPMScheduler(),
                                preset="auto", max_train_steps=budget, **CALLBACK_SETTINGS[candidate](budget))
    # the trajectory's examples at the frozen batch's own timesteps (B bands them by timestep)
    timesteps = stopper.eval_batch.frozen.timesteps.tolist()
    t = with_signals(planted("a", 50, 250, budget=budget), taus=taus, timesteps=timesteps, budget=budget)
    t.losses = list(t.per_example.mean(axis=1))  # the frozen-batch loss the callback's objective gives
    replayed, _ = rules.default_candidates()[candidate](t)
    for objective.step in range(1, budget + 1):
        if stopper.step(objective.step):
            break
    assert stopper.stop_step == replayed
    if 0 not in taus:
        assert (replayed is None) == (taus[0] == 5000)


def test_a_trajectory_without_update_statistics_is_left_out_of_the_candidates_that_need_them():
    with_updates = [with_signals(planted(c, 50, 250), taus=[20] * 4, timesteps=[100, 300, 600, 900], pflug_turns=300)
                    for c in ("a", "b")]
    without = with_signals(planted("c", 50, 250), taus=[20] * 4, timesteps=[100, 300, 600, 900])
    without.dot_previous = without.displacement_sq = None  # a run whose update statistics were skipped
    skipped = {}
    candidates = {"F": rules.pflug(0.1, 10), "N": rules.normalized_settling(2.0, 0.8)}
    cells = {c["rule"]: c for c in rules.compare([*with_updates, without], candidates, skipped)}
    assert (cells["F"]["n"], cells["N"]["n"]) == (2, 3)
    assert list(skipped) == ["F"] and "skipped the update statistics" in skipped["F"][0]


def test_a_candidate_needing_format_3_signals_names_what_is_missing():
    with pytest.raises(ValueError, match="per_example.*format 3"):
        rules.normalized_settling(2.0, 0.8)(planted("a", 50, 250))


def test_default_csv_holds_the_chosen_rules_cells():
    trajectories = [with_signals(planted(f"c{i}", tau, 4 * tau, half=rules.HALVES[i % 2]), [tau] * 4, [1, 2, 3, 4])
                    for i, tau in enumerate([30, 40, 50, 60, 70, 80])]
    cells = rules.compare(trajectories, rules.default_candidates())
    chosen = rules.choose_default(cells)
    assert chosen in rules.default_candidates() and chosen not in rules.REFERENCES
    rows = rules.default_rows(cells, chosen)
    assert [r["half"] for r in rows] == ["held_out", "selection"]
    assert all(set(r) == set(rules.DEFAULT_COLUMNS) and r["model"] == "mini-sd" for r in rows)


def test_checks_pool_with_rescorings_image_for_image(tmp_path):
    trace = {"method": "textual_inversion", "concept": "c", "identity_checks": {"steps": [0, 25], "identity": [0.4, 0.7]}}
    folder = tmp_path / "rescored" / "seed1237" / "textual_inversion"
    folder.mkdir(parents=True)
    (folder / "c.json").write_text(json.dumps({"settings": {"images_per_prompt": 24},
                                               "steps": {"0": {"identity": 0.5}, "25": {"identity": 0.9}}}))
    identity, factor = rules.pooled_checks(tmp_path, trace, 8, ["seed1237"])
    assert identity == pytest.approx([(0.4 * 8 + 0.5 * 24) / 32, (0.7 * 8 + 0.9 * 24) / 32]) and factor == 4
    assert rules.pooled_checks(tmp_path, trace, 8, []) == ([0.4, 0.7], 1.0)
    with pytest.raises(FileNotFoundError, match="rescoring 'other' has not scored textual_inversion c"):
        rules.pooled_checks(tmp_path, trace, 8, ["other"])
    trace["identity_checks"] = {"steps": [0, 25, 50], "identity": [0.4, 0.7, 0.7]}
    with pytest.raises(ValueError, match="no score for the checks at steps \\[50\\]"):
        rules.pooled_checks(tmp_path, trace, 8, ["seed1237"])


def test_a_folder_without_the_rescoring_is_judged_on_its_own_checks_and_the_note_says_so(tmp_path, monkeypatch,
                                                                                         capsys):
    """``--rescored NAME`` pools the folders that hold ``rescored/NAME`` and names those judged without it."""
    rescored, plain = tmp_path / "rescored-run", tmp_path / "plain-run"
    (rescored / "rescored" / "seed1237").mkdir(parents=True)
    plain.mkdir()
    seen = {}

    def load(folder, names=()):
        seen[folder] = list(names)
        return [with_signals(planted(f"c{i}", tau, 4 * tau, half=rules.HALVES[i % 2]), [tau] * 4, [1, 2, 3, 4])
                for i, tau in enumerate([30, 40, 50, 60])]

    monkeypatch.setattr(rules, "load_trajectories", load)
    assert rules.main([str(rescored), str(plain), "--rescored", "seed1237", "--selection-only"]) == 0
    assert seen == {rescored: ["seed1237"], plain: []}
    assert f"note: {plain} has no rescoring 'seed1237'" in capsys.readouterr().err


def test_selection_only_replays_no_held_out_trajectory(tmp_path, monkeypatch, capsys):
    """``--selection-only``: the choice is made before any held-out number exists (and default.csv, which reports
    the held-out half, cannot be asked for with it)."""
    trajectories = [with_signals(planted(f"c{i}", tau, 4 * tau, half=rules.HALVES[i % 2]), [tau] * 4, [1, 2, 3, 4])
                    for i, tau in enumerate([30, 40, 50, 60, 70, 80])]
    monkeypatch.setattr(rules, "load_trajectories", lambda folder, rescored=(): trajectories)
    assert rules.main([str(tmp_path), "--selection-only", "--csv", str(tmp_path / "cells.csv")]) == 0
    with open(tmp_path / "cells.csv") as handle:
        assert {row["half"] for row in csv.DictReader(handle)} == {"selection"}
    assert "Chosen on the selection half" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        rules.main([str(tmp_path), "--selection-only", "--default-csv", str(tmp_path / "default.csv")])
    assert exit_.value.code == 2 and not (tmp_path / "default.csv").exists()


def test_pooled_judges_every_concept_as_one_set_and_chooses_on_it(tmp_path, monkeypatch, capsys):
    """``--pooled``: both halves are one design set (half "all"), chosen on; with ``--rule`` it reports a fresh set
    the same way, into default.csv's columns."""
    trajectories = [with_signals(planted(f"c{i}", tau, 4 * tau, half=rules.HALVES[i % 2]), [tau] * 4, [1, 2, 3, 4])
                    for i, tau in enumerate([30, 40, 50, 60, 70, 80])]
    monkeypatch.setattr(rules, "load_trajectories", lambda folder, rescored=(): trajectories)
    assert rules.main([str(tmp_path), "--pooled", "--csv", str(tmp_path / "cells.csv")]) == 0
    with open(tmp_path / "cells.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["half"] for row in rows} == {"all"} and {row["n"] for row in rows} == {"6"}
    out = capsys.readouterr().out
    assert "Chosen on all concepts (--pooled)" in out and "### all concepts, one set" in out
    assert rules.main([str(tmp_path), "--pooled", "--rule", "S level=0.8 x2", "--default-csv",
                       str(tmp_path / "fresh.csv")]) == 0
    with open(tmp_path / "fresh.csv") as handle:
        assert [(row["half"], row["n"]) for row in csv.DictReader(handle)] == [("all", "6")]
    with pytest.raises(SystemExit) as exit_:
        rules.main([str(tmp_path), "--pooled", "--selection-only"])
    assert exit_.value.code == 2


def test_a_candidate_excluded_for_a_method_is_not_chosen_for_it(tmp_path, monkeypatch, capsys):
    """``--exclude METHOD=RULE``: a candidate that failed a check outside the benchmark (the main job did not stop)
    is left out of that method's part of M and out of the single rules; the note says so. A name that is not a
    candidate is refused."""
    trajectories = [with_signals(planted(f"c{i}", tau, 4 * tau, half=rules.HALVES[i % 2]), [tau] * 4, [1, 2, 3, 4])
                    for i, tau in enumerate([30, 40, 50, 60, 70, 80])]
    monkeypatch.setattr(rules, "load_trajectories", lambda folder, rescored=(): trajectories)
    assert rules.main([str(tmp_path), "--selection-only"]) == 0
    first = capsys.readouterr().out.split("**")[1]
    assert first != "none qualifies"
    part = rules.parse_method_aware(first)["dreambooth_lora"] if first.startswith("M ") else first
    assert rules.main([str(tmp_path), "--selection-only", "--exclude", f"dreambooth_lora={part}"]) == 0
    out = capsys.readouterr().out
    second = out.split("**")[1]
    assert (rules.parse_method_aware(second)["dreambooth_lora"] if second.startswith("M ") else second) != part
    assert f"left out for dreambooth_lora (failed outside the benchmark): {part}" in out
    assert rules.main([str(tmp_path), "--selection-only", "--exclude", "dreambooth_lora=no such rule"]) == 2
    assert "'no such rule' (--rule, --exclude) is not one of" in capsys.readouterr().err
