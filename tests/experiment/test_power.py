"""manage.py power: detection rates by simulated groups, reproducible, with the analysis's own regression."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from bots.synthetic import SyntheticParams
from experiment import game
from experiment.power import PowerError, estimate_power, pick_arms, simulate_frame
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
    assert list(frame.columns) == ["bot", "round", "condition", "selector_id"]
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


@pytest.mark.django_db
def test_command_prints_json() -> None:
    experiment = experiment_create()
    out = StringIO()
    call_command("power", "--experiment", experiment.slug, "--groups", "4,8", "--effect", "0.2", "--reps", "3",
                 "--seed", "9", "--json", stdout=out)
    result = json.loads(out.getvalue())
    assert result["seed"] == 9 and result["effect"] == 0.2
    assert "bot_bias" in result["effect_definition"]
    assert [r["groups"] for r in result["rows"]] == [4, 8]
    for row in result["rows"]:
        assert set(row) == {"groups", "reps", "detected", "detection_rate", "detection_low", "detection_high",
                            "mean_interaction", "failures"}
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
