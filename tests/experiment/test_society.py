"""AI-only societies: designs with no human seat, AI-only arms beside hybrid ones in one experiment, groups
started by staff (service, cockpit, ``manage.py society``) and played with no browser through the same services,
rules, deadlines and logs; the same export; the same replay."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client

from experiment import export, game, presets, services, society
from experiment.export import Options, Scope
from experiment.game import RuleError
from experiment.models import Choice, Condition, Event, Experiment, Group, Message, Participant, Return, Session, Society
from tests import factories

P = Participant
FAST = {"n_rounds": 2, "belief_rounds": "last", "pitch_seconds": 8, "choice_seconds": 8, "return_seconds": 8,
        "feedback_seconds": 1, "belief_seconds": 8}


def _ai_only(**fields: Any):
    experiment = factories.experiment_create(conditions=(), **{"n_bot_selectors": 3, "n_bot_candidates": 4, **FAST, **fields})
    Condition.objects.create(experiment=experiment, name="ai-only", society=Society.AI_ONLY)
    return experiment


def _mixed(**fields: Any):
    experiment = factories.experiment_create(conditions=(("hidden", False),), **{**FAST, **fields})
    Condition.objects.create(experiment=experiment, name="ai-only", society=Society.AI_ONLY)
    Condition.objects.create(experiment=experiment, name="ai-only-disclosed", society=Society.AI_ONLY,
                             disclose_identity=True)
    return experiment


def _nothing_changed(session: Session) -> None:
    assert not Group.objects.filter(session=session).exists()
    assert not P.objects.filter(session=session).exists()
    assert not Event.objects.filter(session=session).exists()


# ---- the design rules -------------------------------------------------------------------------------------

def test_a_design_without_human_seats_needs_ai_only_arms() -> None:
    hybrid, ai = game.ConditionSpec(name="hidden"), game.ConditionSpec(name="bots", society="ai_only")
    problems = game.condition_problems(conditions=[hybrid, ai], n_rounds=10, n_humans=0)
    assert problems and '"hidden"' in problems[0] and "AI only" in problems[0] and '"bots"' not in problems[0]
    assert game.condition_problems(conditions=[ai], n_rounds=10, n_humans=0) == []
    assert game.condition_problems(conditions=[hybrid, ai], n_rounds=10, n_humans=3) == []  # arms side by side
    assert game.design_problems(n_selectors=3, n_bot_selectors=3, n_candidates=4, n_bot_candidates=4,
                                belief_rounds="last", n_rounds=10, quiz=[]) == {}


@pytest.mark.django_db
def test_presets_create_ai_only_and_mixed_designs() -> None:
    ai = presets.experiment_create_from_preset(preset="ai-only")
    assert ai.n_humans == 0 and list(ai.conditions.values_list("society", flat=True)) == ["ai_only"]
    mixed = presets.experiment_create_from_preset(preset="hybrid-vs-ai-only")
    assert mixed.n_humans == 5
    assert list(mixed.conditions.values_list("name", "society")) == [("hidden", "hybrid"), ("ai-only", "ai_only")]


# ---- people never land in an AI-only arm -------------------------------------------------------------------

@pytest.mark.django_db
def test_nobody_can_join_a_study_without_places_for_people() -> None:
    session = factories.session_create(_ai_only())
    with pytest.raises(RuleError) as caught:
        services.participant_join(session_id=session.pk, prolific_pid="abc")
    assert caught.value.code == "no_human_seats"
    _nothing_changed(session)
    response = Client().get(f"/join/{session.code}/?PROLIFIC_PID=abc")
    assert response.status_code == 403
    assert "no places for participants" in response.content.decode()
    _nothing_changed(session)


@pytest.mark.django_db
def test_people_in_the_lobby_form_hybrid_groups_only() -> None:
    experiment = _mixed()
    session = factories.session_create(experiment, capacity=30)
    factories.people_onboard(session, experiment.n_humans * 3)
    groups = list(Group.objects.filter(session=session))
    assert len(groups) == 3
    assert {(g.condition.name, g.society) for g in groups} == {("hidden", "hybrid")}
    assert all(g.participants.filter(kind=P.Kind.HUMAN).count() == experiment.n_humans for g in groups)


# ---- starting AI-only groups ------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_ai_only_groups_get_a_bot_in_every_seat_balanced_over_the_ai_only_arms() -> None:
    experiment = _mixed()
    session = factories.session_create(experiment, seed=3)
    staff = User.objects.create_user("staff", is_staff=True)
    ids = services.society_start(session_id=session.pk, groups=4, actor_id=staff.pk)
    groups = list(Group.objects.filter(pk__in=ids).order_by("number"))
    assert [g.number for g in groups] == [1, 2, 3, 4]
    assert sorted(g.condition.name for g in groups) == ["ai-only", "ai-only", "ai-only-disclosed", "ai-only-disclosed"]
    for g in groups:
        seats = list(g.participants.order_by("seat"))
        assert g.society == Society.AI_ONLY and (g.round_number, g.phase) == (1, "pitch")
        assert [s.seat for s in seats] == ["A", "B", "C", "D", "S1", "S2", "S3"]
        assert all(s.kind == P.Kind.BOT and s.controller == P.Controller.SCRIPTED for s in seats)
        formed = Event.objects.get(group=g, type="group.formed")
        assert formed.payload["society"] == "ai_only" and formed.payload["synthetic_humans"] == 0
    started = Event.objects.get(session=session, type="society.started")
    assert (started.actor_id, started.payload) == (staff.pk, {"groups": 4, "condition": None})
    session.refresh_from_db()
    assert session.design is not None  # the design froze at the start
    more = services.society_start(session_id=session.pk, groups=1, condition="ai-only")
    assert Group.objects.get(pk=more[0]).condition.name == "ai-only"


@pytest.mark.django_db
@pytest.mark.parametrize(("groups", "condition", "code"), [
    pytest.param(0, None, "invalid_groups", id="zero"),
    pytest.param(-3, None, "invalid_groups", id="negative"),
    pytest.param(services.MAX_SOCIETY_GROUPS + 1, None, "invalid_groups", id="too-many"),
    pytest.param("3", None, "invalid_groups", id="text"),
    pytest.param(True, None, "invalid_groups", id="boolean"),
    pytest.param(2, "hidden", "unknown_condition", id="a-hybrid-arm"),
    pytest.param(2, "nope<script>" + "x" * 5000, "unknown_condition", id="unknown-huge"),
])
def test_bad_requests_to_start_a_society_are_refused_and_change_nothing(groups: Any, condition: str | None,
                                                                         code: str) -> None:
    session = factories.session_create(_mixed())
    with pytest.raises(RuleError) as caught:
        services.society_start(session_id=session.pk, groups=groups, condition=condition)
    assert caught.value.code == code and len(caught.value.message) < 300
    _nothing_changed(session)


@pytest.mark.django_db
def test_a_society_needs_an_ai_only_arm_and_a_running_session() -> None:
    hybrid_only = factories.session_create(factories.experiment_create(**FAST))
    with pytest.raises(RuleError) as caught:
        services.society_start(session_id=hybrid_only.pk, groups=1)
    assert caught.value.code == "no_ai_only_condition"
    _nothing_changed(hybrid_only)
    ended = factories.session_create(_ai_only())
    services.session_end(session_id=ended.pk, actor_id=None)
    with pytest.raises(RuleError) as caught:
        services.society_start(session_id=ended.pk, groups=1)
    assert caught.value.code == "session_ended"
    assert not Group.objects.filter(session=ended).exists()


# ---- the cockpit ------------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_staff_start_ai_only_groups_from_the_cockpit(admin_client: Client) -> None:
    session = factories.session_create(_mixed())
    page = admin_client.get(f"/cockpit/sessions/{session.pk}/").content.decode()
    assert "Start AI-only groups" in page and 'value="ai-only-disclosed"' in page
    url = f"/cockpit/sessions/{session.pk}/society/"
    answer = admin_client.post(url, {"groups": "2", "condition": "ai-only"})
    assert answer.status_code == 200 and answer.json()["ok"] is True and len(answer.json()["groups"]) == 2
    assert Group.objects.filter(session=session, society=Society.AI_ONLY, condition__name="ai-only").count() == 2
    for bad, code in [({"groups": "many"}, "invalid_groups"), ({"groups": "0"}, "invalid_groups"),
                      ({"groups": "1", "condition": "hidden"}, "unknown_condition"), ({}, "invalid_groups")]:
        refused = admin_client.post(url, bad)
        assert refused.status_code in (400, 409) and refused.json()["code"] == code, bad
    assert Group.objects.filter(session=session).count() == 2
    assert admin_client.get(url).status_code == 405
    assert admin_client.post(f"/cockpit/sessions/{session.pk + 1000}/society/", {"groups": "1"}).status_code == 404


@pytest.mark.django_db
def test_only_staff_start_ai_only_groups(client: Client) -> None:
    session = factories.session_create(_mixed())
    url = f"/cockpit/sessions/{session.pk}/society/"
    assert client.post(url, {"groups": "1"}).status_code == 302  # to the login page
    User.objects.create_user("someone", password="pw-not-staff-123")
    client.login(username="someone", password="pw-not-staff-123")
    assert client.post(url, {"groups": "1"}).status_code == 302
    _nothing_changed(session)


# ---- playing a whole society with no browser -----------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_manage_py_society_plays_ai_only_and_the_data_export_and_replay_like_any_session() -> None:
    experiment = _mixed()
    out = io.StringIO()
    call_command("society", "--experiment", experiment.slug, "--groups", "3", "--seed", "11", "--json", stdout=out)
    s = json.loads(out.getvalue())
    assert (s["groups"], s["groups_finished"], s["groups_playing"]) == (3, 3, 0)
    session = Session.objects.get(pk=s["session"])
    assert session.status == Session.Status.CLOSED and session.seed == 11
    groups = Group.objects.filter(session=session)
    rounds, n_sel, n_cand = experiment.n_rounds, experiment.n_selectors, experiment.n_candidates
    # Every decision of every seat is stored (the scripted bots act at once: no human-like delay, no timeout).
    assert Message.objects.filter(group__in=groups, timed_out=False).count() == 3 * rounds * n_cand
    assert Choice.objects.filter(group__in=groups, timed_out=False).count() == 3 * rounds * n_sel
    assert Return.objects.filter(choice__group__in=groups, timed_out=False).count() == Choice.objects.filter(
        group__in=groups, candidate__isnull=False).count()
    assert s["stored"]["choices"] == 3 * rounds * n_sel and s["defaults_applied"] == 0
    assert not P.objects.filter(session=session, kind=P.Kind.HUMAN).exists()
    # The export carries the society of every row, and the replay rebuilds the session as stored.
    header = [c.name for c in export.columns_of(export.table("choices"))]
    rows = list(export.rows(export.table("choices"), scope=Scope.session(session.pk), options=Options()))
    assert "society" in header and {r[header.index("society")] for r in rows} == {"ai_only"}
    assert len(rows) == 3 * rounds * n_sel
    # The adaptation metrics sit beside the hybrid ones: every group round, counted over bot selectors.
    t = export.derived_table("adaptation_groups")
    names = [c.name for c in t.columns]
    kinds = {r[names.index("selector_kind")] for r in t.rows(Scope.session(session.pk))}
    assert "bot" in kinds and "human" not in kinds
    replayed = io.StringIO()
    try:
        call_command("replay", str(session.pk), "--check", stdout=replayed)
    except CommandError:
        raise AssertionError(replayed.getvalue()) from None
    assert "identical" in replayed.getvalue()


@pytest.mark.django_db(transaction=True)
def test_manage_py_society_says_what_is_wrong() -> None:
    hybrid = factories.experiment_create(**FAST)
    with pytest.raises(CommandError, match="no AI-only condition"):
        call_command("society", "--experiment", hybrid.slug, "--groups", "1", stdout=io.StringIO())
    with pytest.raises(CommandError, match="No experiment with slug"):
        call_command("society", "--experiment", "nope", "--groups", "1", stdout=io.StringIO())
    with pytest.raises(CommandError, match="--groups must be 1 or more"):
        call_command("society", "--experiment", hybrid.slug, "--groups", "0", stdout=io.StringIO())
    with pytest.raises(CommandError, match="No session with id"):
        call_command("society", "--experiment", hybrid.slug, "--groups", "1", "--session", "999999", stdout=io.StringIO())
    other = factories.session_create(_ai_only())
    with pytest.raises(CommandError, match="belongs to experiment"):
        call_command("society", "--experiment", _mixed().slug, "--groups", "1", "--session", str(other.pk),
                     stdout=io.StringIO())
    assert not Group.objects.exists()


def test_the_longest_game_counts_every_phase_of_every_round() -> None:
    design = Experiment(n_rounds=3, belief_rounds="1,3", pitch_seconds=10, choice_seconds=20, return_seconds=30,
                        feedback_seconds=5, belief_seconds=7)
    assert society.longest_game_seconds(design) == 3 * (10 + 20 + 30 + 5) + 2 * 7
