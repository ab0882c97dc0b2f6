"""manage.py power: detection rates by simulated groups, reproducible, with the analysis's own regression."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from bots.synthetic import SyntheticParams
from experiment import game, power
from experiment.power import Plant, PowerError, PowerRow, estimate_power, pick_arms, planted_frame, simulate_frame
from tests.factories import experiment_create

ARMS = [game.ConditionSpec(name="hidden"), game.ConditionSpec(name="disclosed", disclose_identity=True)]
# Exploring, fast-learning selectors: a bias against labelled bots turns into a clear rise in the disclosed arm.
LEARNERS = SyntheticParams(temperature=0.4, learning_rate=0.8)


def test_no_effect_is_detected_about_as_often_as_alpha() -> None:
    (row,) = estimate_power(params=game.Params(), conditions=ARMS, groups=[10], effect=0.0, reps=30, seed=11)
    # One-sided at alpha 0.05 the expected rate is 0.025; 7 or more of 30 has probability below 1e-4.
    assert row.rate <= 0.2
    assert row.failures == 0
    assert abs(sum(row.estimates) / len(row.estimates)) < 0.1


def test_a_large_effect_is_detected_more_with_more_groups() -> None:
    few, many = estimate_power(params=game.Params(), conditions=ARMS, groups=[20, 160], effect=0.5, reps=20, seed=5,
                               behaviour=LEARNERS)
    assert many.rate >= 0.7
    assert many.rate >= few.rate
    assert all(e > 0 for e in (sum(few.estimates) / len(few.estimates), sum(many.estimates) / len(many.estimates)))


def test_the_frame_has_the_analysis_columns_and_balanced_arms() -> None:
    frame = simulate_frame(params=game.Params(), arms=pick_arms(ARMS), n_groups=6, effect=0.2, seed=3)
    assert list(frame.columns) == ["bot", "round", "condition", "selector_id", "group_id", "session_id"]
    assert frame["group_id"].nunique() == 6
    assert frame.groupby("condition")["selector_id"].nunique().to_dict() == {"disclosed": 9, "hidden": 9}
    assert sorted(frame["round"].unique()) == list(range(1, 11))
    assert set(frame["bot"].unique()) == {0, 1}


def test_same_seed_same_output() -> None:
    kwargs = {"params": game.Params(), "conditions": ARMS, "groups": [6], "effect": 0.3, "reps": 5}
    first = [r.as_dict() for r in estimate_power(**kwargs, seed=2)]
    assert first == [r.as_dict() for r in estimate_power(**kwargs, seed=2)]
    assert first != [r.as_dict() for r in estimate_power(**kwargs, seed=3)]


def test_a_design_without_a_hidden_and_a_disclosed_arm_is_refused() -> None:
    with pytest.raises(PowerError, match="two conditions"):
        estimate_power(params=game.Params(), conditions=ARMS[:1], groups=[10], effect=0.1, reps=1, seed=1)


ROW_KEYS = {"groups", "reps", "method", "detected", "detection_rate", "detection_low", "detection_high", "rejected",
            "rejection_rate", "rejection_low", "rejection_high", "mean_estimate", "truth", "bias", "covered", "coverage",
            "coverage_low", "coverage_high", "failures"}


@pytest.mark.django_db
def test_command_prints_json() -> None:
    experiment = experiment_create()
    out = StringIO()
    call_command("power", "--experiment", experiment.slug, "--groups", "4,8", "--effect", "0.2", "--reps", "3",
                 "--seed", "9", "--json", stdout=out)
    result = json.loads(out.getvalue())
    assert result["seed"] == 9 and result["effect"] == 0.2 and result["model"] == "behavioural"
    assert "bot_bias" in result["effect_definition"]
    assert (result["cluster"], result["inference"]) == ("group", "auto")
    assert [r["groups"] for r in result["rows"]] == [4, 8]
    for row in result["rows"]:
        assert set(row) == ROW_KEYS
        assert row["truth"] is None and row["coverage"] is None and row["bias"] is None  # unknown for effect > 0
        # (Wilson's lower end is 5e-17, not 0, at 0 successes: float rounding.)
        assert row["reps"] == 3 and 0 <= row["detection_low"] <= row["detection_rate"] + 1e-9 <= row["detection_high"] + 2e-9 <= 1 + 2e-9


@pytest.mark.django_db
def test_command_table_and_bad_input() -> None:
    experiment = experiment_create()
    out = StringIO()
    call_command("power", "--experiment", experiment.slug, "--groups", "4", "--effect", "0.2", "--reps", "2",
                 "--seed", "1", stdout=out)
    assert "groups" in out.getvalue() and "bot_bias" in out.getvalue()
    with pytest.raises(CommandError, match="commas"):
        call_command("power", "--experiment", experiment.slug, "--groups", "ten", "--effect", "0.2")
    with pytest.raises(CommandError, match="No experiment"):
        call_command("power", "--experiment", "nope", "--groups", "4", "--effect", "0.2")
    with pytest.raises(CommandError, match="--effect"):
        call_command("power", "--experiment", experiment.slug, "--groups", "4", "--effect", "0.2",
                     "--behaviour", "bot_bias=0.3")
    one_arm = experiment_create(conditions=(("hidden", False),))
    with pytest.raises(CommandError, match="two conditions"):
        call_command("power", "--experiment", one_arm.slug, "--groups", "4", "--effect", "0.2")


# ---- the planted estimand --------------------------------------------------------------------------------

def test_the_target_is_the_planted_slope_without_random_effects_and_smaller_with_them() -> None:
    plain = Plant(slope=0.3, group_sd=0, group_slope_sd=0, selector_sd=0)
    assert plain.target(10) == pytest.approx(0.3, abs=1e-9)
    assert Plant(slope=0.0).target(10) == pytest.approx(0.0, abs=1e-12)  # identical arms: no difference
    attenuated = Plant(slope=0.3).target(10)
    assert 0.15 < attenuated < 0.3
    # Larger random effects attenuate more.
    assert Plant(slope=0.3, group_sd=1.0, selector_sd=1.0).target(10) < attenuated


def test_planted_frame_shape_balance_and_reproducibility() -> None:
    arms = pick_arms(ARMS)
    frame = planted_frame(params=game.Params(), arms=arms, n_groups=8, plant=Plant(slope=0.3), seed=4)
    assert list(frame.columns) == ["bot", "round", "condition", "selector_id", "group_id", "session_id"]
    assert len(frame) == 8 * 3 * 10
    assert frame.groupby("condition")["group_id"].nunique().to_dict() == {"disclosed": 4, "hidden": 4}
    assert frame.equals(planted_frame(params=game.Params(), arms=arms, n_groups=8, plant=Plant(slope=0.3), seed=4))
    # A planted slope shows in the data: the disclosed arm chooses bots far more in round 10 than in round 1.
    big = planted_frame(params=game.Params(), arms=arms, n_groups=200, plant=Plant(slope=0.3), seed=5)
    share = big.groupby(["condition", "round"])["bot"].mean()
    assert share[("disclosed", 10)] - share[("disclosed", 1)] > 0.3
    assert abs(share[("hidden", 10)] - share[("hidden", 1)]) < 0.1


def test_power_row_counts_coverage_over_fitted_studies() -> None:
    row = PowerRow(groups=10, reps=10, truth=0.2, covered=7, rejected=4, detected=3, failures=2,
                   estimates=[0.1, 0.2, 0.3, 0.2, 0.25, 0.15, 0.2, 0.2])
    d = row.as_dict()
    assert d["coverage"] == pytest.approx(7 / 8) and d["covered"] == 7
    assert d["bias"] == pytest.approx(0.2 - 0.2) and d["mean_estimate"] == pytest.approx(0.2)
    assert d["rejection_rate"] == 0.4 and d["detection_rate"] == 0.3
    assert d["coverage_low"] < 7 / 8 < d["coverage_high"]
    unknown = PowerRow(groups=10, reps=3, estimates=[0.1, 0.1, 0.1]).as_dict()
    assert unknown["coverage"] is None and unknown["bias"] is None


def test_coverage_is_measured_against_the_true_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same studies cover the true value most of the time and a wrong one never."""
    kwargs = {"params": game.Params(), "conditions": ARMS, "groups": [60], "reps": 12, "seed": 8}
    (right,) = estimate_power(**kwargs, plant=Plant(slope=0.3))
    assert right.truth == pytest.approx(Plant(slope=0.3).target(10)) and right.method == "crve"
    assert right.covered >= 9
    monkeypatch.setattr(power.Plant, "target", lambda self, rounds: 5.0)
    (wrong,) = estimate_power(**kwargs, plant=Plant(slope=0.3))
    assert wrong.estimates == right.estimates and wrong.covered == 0


@pytest.mark.parametrize("inference, method", [("auto", "cr2"), ("bootstrap", "score-bootstrap")])
def test_a_planted_null_is_rejected_about_alpha_of_the_time(inference: str, method: str) -> None:
    (row,) = estimate_power(params=game.Params(), conditions=ARMS, groups=[10], plant=Plant(slope=0.0), reps=60,
                            seed=21, draws=199, inference=inference)
    assert row.method == method and row.truth == 0.0 and row.failures == 0
    # Expected about 3 of 60 (two-sided 5 %); 10 or more has probability below 0.2 % even at a true 7 %.
    assert row.rejected <= 9
    assert row.covered == row.reps - row.rejected  # at a null truth, covering it is not rejecting it
    assert abs(sum(row.estimates) / len(row.estimates)) < 0.05


def test_a_planted_slope_is_detected_and_recovered() -> None:
    (row,) = estimate_power(params=game.Params(), conditions=ARMS, groups=[40], plant=Plant(slope=0.3), reps=15,
                            seed=22, draws=199)
    assert row.detected >= 13
    assert abs(sum(row.estimates) / len(row.estimates) - row.truth) < 0.05


@pytest.mark.django_db
def test_command_plants_the_estimand_and_refuses_bad_input() -> None:
    experiment = experiment_create()
    out = StringIO()
    call_command("power", "--experiment", experiment.slug, "--groups", "4,6", "--plant", "slope=0.3,start=0.4",
                 "--plant", "group_slope_sd=0.2", "--reps", "3", "--seed", "9", "--draws", "199", "--json", stdout=out)
    result = json.loads(out.getvalue())
    assert result["model"] == "planted" and result["plant"]["slope"] == 0.3 and result["plant"]["start"] == 0.4
    assert result["plant"]["group_slope_sd"] == 0.2 and "effect" not in result
    for row in result["rows"]:
        assert set(row) == ROW_KEYS and row["method"] == "cr2"
        assert row["truth"] == pytest.approx(Plant(slope=0.3, start=0.4, group_slope_sd=0.2).target(experiment.n_rounds))
        assert 0 <= row["coverage"] <= 1 and row["bias"] == pytest.approx(row["mean_estimate"] - row["truth"])
    table = StringIO()
    call_command("power", "--experiment", experiment.slug, "--groups", "4", "--plant", "slope=0", "--reps", "2",
                 "--seed", "1", "--draws", "199", stdout=table)
    assert "coverage" in table.getvalue() and "True value of round:disclosed" in table.getvalue()
    base = ["power", "--experiment", experiment.slug, "--reps", "2"]
    for match, args in [("slope needs a number, not 'abc'", ["--groups", "4", "--plant", "slope=abc"]),
                        ("a name among slope, start", ["--groups", "4", "--plant", "steepness=0.3"]),
                        ("needs slope=VALUE", ["--groups", "4", "--plant", "start=0.3"]),
                        ("between 0 and 1", ["--groups", "4", "--plant", "slope=0.3,start=1.5"]),
                        ("standard deviation", ["--groups", "4", "--plant", "slope=0.3,group_sd=-1"]),
                        ("at least 2", ["--groups", "1", "--plant", "slope=0.3"]),
                        ("at least 2", ["--groups", "10,0", "--effect", "0.1"])]:
        with pytest.raises(CommandError, match=match):
            call_command(*base, *args)
    with pytest.raises(CommandError, match="cluster level must be one of group, session, selector"):
        call_command(*base, "--groups", "4", "--plant", "slope=0.3", "--cluster", "nonsense")
    with pytest.raises(CommandError, match="not allowed with argument"):
        call_command(*base, "--groups", "4", "--plant", "slope=0.3", "--effect", "0.1")
    with pytest.raises(CommandError, match="one of the arguments --effect --plant is required"):
        call_command(*base, "--groups", "4")
