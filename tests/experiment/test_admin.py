"""The experimenter's admin: designing experiments, launching sessions, and reading (never editing) game data."""

from __future__ import annotations

import html
import json
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import models as dj_models
from django.test import Client
from django.urls import reverse

from experiment import game, presets, services
from experiment.game import RuleError
from experiment.models import Choice, Condition, Event, Experiment, Participant, Session
from tests import factories

pytestmark = pytest.mark.django_db

ADD_URL = "/admin/experiment/experiment/add/"


# ---- helpers ---------------------------------------------------------------------------------------

def _design_post(*, conditions: tuple[tuple[str, bool, int], ...] = (("hidden", False, 1), ("disclosed", True, 1)),
                 **changes: Any) -> dict[str, Any]:
    """What the add form posts when the experimenter keeps every default (then applies ``changes``)."""
    data: dict[str, Any] = {}
    for field in Experiment._meta.concrete_fields:
        if not field.editable or field.primary_key:
            continue
        value = field.get_default()
        if isinstance(field, dj_models.BooleanField):
            if value:
                data[field.name] = "on"
            continue
        if field.name == "quiz":
            value = json.dumps(value)
        data[field.name] = "" if value is None else str(value)
    data.update(name="Trust study", slug="trust-study")
    data.update({"conditions-TOTAL_FORMS": str(len(conditions)), "conditions-INITIAL_FORMS": "0",
                 "conditions-MIN_NUM_FORMS": "0", "conditions-MAX_NUM_FORMS": "1000"})
    for i, (name, disclose, from_round) in enumerate(conditions):
        data[f"conditions-{i}-name"] = name
        data[f"conditions-{i}-society"] = "hybrid"
        data[f"conditions-{i}-disclose_from_round"] = str(from_round)
        if disclose:
            data[f"conditions-{i}-disclose_identity"] = "on"
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def _page(response) -> str:
    return html.unescape(response.content.decode())


def _results(response) -> str:
    """The rows of a changelist (not its filters, which list every value)."""
    page = _page(response)
    start = page.index('id="result_list"')
    return page[start:page.index("</table>", start)]


def _existing_conditions(experiment: Experiment) -> dict[str, str]:
    """The inline rows of saved conditions, as the change form posts them when they are read-only."""
    rows = list(experiment.conditions.all())
    data = {"conditions-TOTAL_FORMS": str(len(rows)), "conditions-INITIAL_FORMS": str(len(rows))}
    for i, condition in enumerate(rows):
        data[f"conditions-{i}-id"] = str(condition.pk)
        data[f"conditions-{i}-experiment"] = str(experiment.pk)
    return data


def _design(experiment: Experiment) -> dict[str, Any]:
    return {f.name: getattr(experiment, f.name) for f in Experiment._meta.concrete_fields
            if f.name not in {"id", "slug", "name", "created_at"}}


# ---- creating an experiment ----------------------------------------------------------------------------

def test_the_add_form_offers_the_design_defaults_and_both_arms(admin_client: Client) -> None:
    page = _page(admin_client.get(ADD_URL))
    for section in ("Group composition", "Rounds and phases", "Money and amounts", "Belief and feedback",
                    "Timeouts and dropouts", "Lobby", "Payment and completion", "Texts and quiz"):
        assert f">{section}<" in page
    assert 'name="conditions-0-name" value="hidden"' in page
    assert 'name="conditions-1-name" value="disclosed"' in page
    assert Experiment._meta.get_field("belief_rounds").help_text in page


def test_creating_an_experiment_with_the_defaults(admin_client: Client) -> None:
    response = admin_client.post(ADD_URL, _design_post())
    assert response.status_code == 302, _page(response)[:3000]
    experiment = Experiment.objects.get(slug="trust-study")
    assert (experiment.n_selectors, experiment.n_bot_selectors, experiment.n_candidates, experiment.n_bot_candidates) == (3, 0, 4, 2)
    assert (experiment.n_rounds, experiment.endowment, experiment.multiplier, experiment.message_max_chars) == (10, 10, 3, 200)
    assert (experiment.pitch_seconds, experiment.choice_seconds, experiment.return_seconds,
            experiment.feedback_seconds) == (60, 60, 60, 15)
    assert experiment.belief_rounds == "last" and experiment.params().belief_rounds == {10}
    assert experiment.lobby_timeout_seconds == 600 and experiment.dropout_after == 2
    assert experiment.bonus_per_point == Decimal("0.01")
    assert experiment.quiz == Experiment._meta.get_field("quiz").get_default()
    assert list(experiment.conditions.values_list("name", "disclose_identity", "disclose_from_round")) == [
        ("hidden", False, 1), ("disclosed", True, 1)]


def test_an_all_bot_design_with_an_ai_only_arm_is_accepted(admin_client: Client) -> None:
    post = _design_post(conditions=(("bots", False, 1),), n_bot_selectors="3", n_bot_candidates="4")
    post["conditions-0-society"] = "ai_only"
    response = admin_client.post(ADD_URL, post)
    assert response.status_code == 302, _page(response)[:3000]
    experiment = Experiment.objects.get(slug="trust-study")
    assert experiment.n_humans == 0
    assert list(experiment.conditions.values_list("name", "society")) == [("bots", "ai_only")]
    refused = admin_client.post(ADD_URL, {**_design_post(slug="other"), "conditions-0-society": "martian"})
    assert refused.status_code == 200 and "Select a valid choice" in _page(refused)
    assert not Experiment.objects.filter(slug="other").exists()


IMPOSSIBLE = [
    pytest.param({"n_bot_candidates": "5"}, "There are 5 bot candidates but only 4 candidate seats", id="bots>candidates"),
    pytest.param({"n_bot_selectors": "4"}, "There are 4 bot selectors but only 3 selector seats", id="bots>selectors"),
    pytest.param({"n_bot_selectors": "3", "n_bot_candidates": "4"},
                 'Every seat is a bot, so no group can form from people in the lobby: set the society of condition '
                 '"hidden", "disclosed" to AI only', id="no-human-in-hybrid-arms"),
    pytest.param({"n_candidates": "1", "n_bot_candidates": "0"}, "Partner choice needs at least 2 candidates",
                 id="one-candidate"),
    pytest.param({"belief_rounds": "11"}, "Belief round 11 is outside rounds 1..10: use rounds from 1 to 10", id="belief>R"),
    pytest.param({"belief_rounds": "0"}, "Belief round 0 is outside rounds 1..10", id="belief-0"),
    pytest.param({"belief_rounds": "sometimes"}, 'Belief rounds must be "last" or round numbers', id="belief-text"),
    pytest.param({"quiz": '[{"question": "x", '}, "The quiz is not valid JSON", id="quiz-not-json"),
    pytest.param({"quiz": '{"question": "x"}'}, "The quiz must be a list of questions", id="quiz-not-list"),
    pytest.param({"quiz": '[{"question": "x"}]'}, 'Question 1 needs "question", "options" and "answer"', id="quiz-keys"),
    pytest.param({"quiz": '[{"question": "x", "options": ["a", "b"], "answer": "c"}]'},
                 "The answer of question 1 must be one of its options", id="quiz-answer"),
    pytest.param({"quiz": '[{"question": "x", "options": [1, 2], "answer": 1}]'},
                 "The options of question 1 must be a list of at least 2 texts", id="quiz-numbers"),
    pytest.param({"bonus_per_point": "-0.01"}, "The bonus per point cannot be negative", id="bonus-negative"),
    pytest.param({"completion_code": "PL COMPLETE"}, "must be letters, digits", id="code-space"),
    pytest.param({"dropout_code": "PLCOMPLETE"}, "The dropout code is the same as the completion code", id="code-shared"),
    pytest.param({"completion_redirect_url": "https://app.prolific.com/submissions/complete?cc=OTHER"},
                 'the completion code is "PLCOMPLETE": make them the same', id="redirect-code"),
    pytest.param({"conditions": ()}, "Add at least one condition", id="no-condition"),
    pytest.param({"conditions": (("late", True, 11),)},
                 'Condition "late" shows identity labels from round 11, but the experiment has 10 rounds', id="disclose>R"),
    pytest.param({"conditions": (("hidden", False, 1), ("hidden", True, 1))}, 'Two conditions are named "hidden"',
                 id="same-name"),
    pytest.param({"conditions": (("hidden", False, 1), ("Hidden", True, 1))}, 'Two conditions are named "Hidden"',
                 id="same-name-case"),
]


@pytest.mark.parametrize(("changes", "message"), IMPOSSIBLE)
def test_impossible_designs_are_refused_with_what_to_change(admin_client: Client, changes: dict[str, Any],
                                                             message: str) -> None:
    response = admin_client.post(ADD_URL, _design_post(**changes))
    assert response.status_code == 200
    assert message in _page(response)
    assert not Experiment.objects.filter(slug="trust-study").exists()
    assert not Condition.objects.exists()


REFUSED_BY_FIELD = [
    pytest.param(name, value, id=f"{name}={value}")
    for name in ("pitch_seconds", "choice_seconds", "return_seconds", "feedback_seconds", "belief_seconds",
                 "lobby_timeout_seconds", "n_rounds", "endowment", "multiplier", "message_max_chars", "dropout_after",
                 "n_selectors")
    for value in ("0", "-5")
] + [
    pytest.param("participation_fee", "-1", id="fee-negative"),
    pytest.param("n_rounds", "201", id="rounds-too-many"),
    pytest.param("pitch_seconds", "ten", id="duration-not-a-number"),
    pytest.param("conditions-0-disclose_from_round", "0", id="disclose-from-0"),
]


@pytest.mark.parametrize(("field", "value"), REFUSED_BY_FIELD)
def test_negative_or_zero_durations_and_amounts_are_refused(admin_client: Client, field: str, value: str) -> None:
    response = admin_client.post(ADD_URL, _design_post(**{field: value}))
    assert response.status_code == 200
    page = _page(response)
    assert "Please correct the error" in page
    assert ("Ensure this value is greater than or equal to" in page or "Ensure this value is less than or equal to" in page
            or "Enter a whole number" in page)
    assert not Experiment.objects.exists()


def test_an_edit_that_makes_a_condition_impossible_is_refused(admin_client: Client) -> None:
    experiment = factories.experiment_create(conditions=(("late", True),))
    condition = experiment.conditions.get()
    condition.disclose_from_round = 8
    condition.save()
    data = _design_post(conditions=(), n_rounds="5", name=experiment.name, slug=experiment.slug)
    data.update({"conditions-TOTAL_FORMS": "1", "conditions-INITIAL_FORMS": "1", "conditions-0-id": str(condition.pk),
                 "conditions-0-experiment": str(experiment.pk), "conditions-0-name": "late",
                 "conditions-0-disclose_identity": "on", "conditions-0-disclose_from_round": "8",
                 "conditions-0-society": "hybrid"})
    response = admin_client.post(reverse("admin:experiment_experiment_change", args=[experiment.pk]), data)
    assert response.status_code == 200
    assert 'shows identity labels from round 8, but the experiment has 5 rounds' in _page(response)
    experiment.refresh_from_db()
    assert experiment.n_rounds == 10


def test_a_design_in_use_is_locked(admin_client: Client) -> None:
    experiment = factories.experiment_create()
    session = factories.session_create(experiment)
    services.participant_join(session_id=session.pk)
    url = reverse("admin:experiment_experiment_change", args=[experiment.pk])
    page = _page(admin_client.get(url))
    assert "its design is locked" in page and 'name="n_rounds"' not in page
    data = {**_design_post(conditions=(), n_rounds="3", name="Renamed", slug=experiment.slug),
            **_existing_conditions(experiment)}
    response = admin_client.post(url, data)
    assert response.status_code == 302, _page(response)[:3000]
    experiment.refresh_from_db()
    assert experiment.name == "Renamed" and experiment.n_rounds == 10
    assert experiment.conditions.count() == 2


# ---- duplicate and presets --------------------------------------------------------------------------------

def test_duplicate_copies_the_design_and_conditions_under_a_new_slug(admin_client: Client) -> None:
    original = factories.experiment_create(n_rounds=7, endowment=20, belief_rounds="1,7", bonus_per_point=Decimal("0.05"),
                                           conditions=(("hidden", False), ("disclosed", True)))
    late = original.conditions.get(name="disclosed")
    late.disclose_from_round = 4
    late.save()
    factories.session_create(original)
    changelist = reverse("admin:experiment_experiment_changelist")
    for _ in range(2):
        response = admin_client.post(changelist, {"action": "duplicate", "_selected_action": [original.pk]})
        assert response.status_code == 302
    copies = list(Experiment.objects.exclude(pk=original.pk).order_by("pk"))
    assert [c.slug for c in copies] == [f"{original.slug}-copy", f"{original.slug}-copy-2"]
    for copy in copies:
        assert copy.name == f"{original.name} (copy)"
        assert _design(copy) == _design(original)
        copy.full_clean()
        assert list(copy.conditions.values_list("name", "disclose_identity", "disclose_from_round")) == [
            ("hidden", False, 1), ("disclosed", True, 4)]
        assert not copy.sessions.exists()
    assert original.conditions.count() == 2 and original.sessions.count() == 1


@pytest.mark.parametrize(("preset", "arms"), [
    ("disclosed", [("disclosed", True)]),
    ("hidden", [("hidden", False)]),
    ("hidden-vs-disclosed", [("hidden", False), ("disclosed", True)]),
])
def test_each_preset_is_a_valid_experiment_with_its_arms(preset: str, arms: list[tuple[str, bool]]) -> None:
    experiment = presets.experiment_create_from_preset(preset=preset)
    experiment.full_clean()
    assert experiment.name == presets.PRESETS[preset]["label"]
    assert list(experiment.conditions.values_list("name", "disclose_identity")) == arms
    # The DESIGN.md defaults, as the model declares them.
    assert _design(experiment) == _design(Experiment())
    specs = [game.ConditionSpec(c.name, c.disclose_identity, c.disclose_from_round) for c in experiment.conditions.all()]
    assert game.condition_problems(conditions=specs, n_rounds=experiment.n_rounds) == []
    again = presets.experiment_create_from_preset(preset=preset, name="My study")
    assert again.name == "My study" and again.slug == "my-study"
    third = presets.experiment_create_from_preset(preset=preset)
    assert third.slug == f"{experiment.slug}-2"


def test_an_unknown_preset_is_refused_and_creates_nothing() -> None:
    with pytest.raises(RuleError, match="choose one of"):
        presets.experiment_create_from_preset(preset="nope")
    assert not Experiment.objects.exists()


def test_the_changelist_offers_the_presets_and_one_click_creates(admin_client: Client) -> None:
    page = _page(admin_client.get(reverse("admin:experiment_experiment_changelist")))
    for preset in presets.PRESETS.values():
        assert preset["label"] in page
    url = reverse("admin:experiment_experiment_preset", args=["hidden-vs-disclosed"])
    assert admin_client.get(url).status_code == 405
    assert not Experiment.objects.exists()
    response = admin_client.post(url)
    experiment = Experiment.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:experiment_experiment_change", args=[experiment.pk])
    assert experiment.conditions.count() == 2
    assert admin_client.post(reverse("admin:experiment_experiment_preset", args=["nope"])).status_code == 404


# ---- sessions ------------------------------------------------------------------------------------------

def test_the_session_page_shows_the_join_link_prolific_url_and_completion(admin_client: Client) -> None:
    experiment = factories.experiment_create(completion_code="C0DE42")
    session = factories.session_create(experiment, label="pilot")
    page = _page(admin_client.get(reverse("admin:experiment_session_change", args=[session.pk])))
    join = f"http://testserver/join/{session.code}/"
    assert join in page
    assert join + "?PROLIFIC_PID={{%PROLIFIC_PID%}}&STUDY_ID={{%STUDY_ID%}}&SESSION_ID={{%SESSION_ID%}}" in page
    assert "https://app.prolific.com/submissions/complete?cc=C0DE42" in page
    assert experiment.lobby_timeout_code in page and experiment.dropout_code in page
    # The link the page shows is the one that admits people.
    client = Client()
    assert client.get(f"/join/{session.code}/?PROLIFIC_PID=abc").status_code == 302
    assert session.participants.get().prolific_pid == "abc"


def test_creating_a_session_with_a_capacity(admin_client: Client) -> None:
    experiment = factories.experiment_create()
    add = reverse("admin:experiment_session_add")
    base = {"experiment": experiment.pk, "label": "wave 1", "status": "open", "over_recruitment": "2",
            "synthetic_fill_after": ""}
    for capacity, message in (("0", "Ensure this value is greater than or equal to 1"),
                              ("4", f"needs {experiment.n_humans} people, so a capacity of 4 can never start a game")):
        response = admin_client.post(add, {**base, "capacity": capacity})
        assert response.status_code == 200 and message in _page(response)
    assert not Session.objects.exists()
    response = admin_client.post(add, {**base, "capacity": "20"})
    assert response.status_code == 302, _page(response)[:3000]
    session = Session.objects.get()
    assert (session.capacity, session.over_recruitment, session.status) == (20, 2, "open")


@pytest.mark.parametrize(("action", "status"), [("recruitment_pause", "paused"), ("recruitment_close", "closed")])
def test_recruitment_actions_change_the_status_and_log_the_actor(admin_client: Client, admin_user, action: str,
                                                                 status: str) -> None:
    session = factories.session_create()
    response = admin_client.post(reverse("admin:experiment_session_changelist"),
                                 {"action": action, "_selected_action": [session.pk]})
    assert response.status_code == 302
    session.refresh_from_db()
    assert session.status == status
    event = Event.objects.get(session=session, type="session.status_changed")
    assert event.actor == admin_user and event.payload == {"from": "open", "to": status}
    with pytest.raises(RuleError) as refused:
        services.participant_join(session_id=session.pk)
    assert refused.value.code == "session_closed"

    admin_client.post(reverse("admin:experiment_session_changelist"),
                      {"action": "recruitment_open", "_selected_action": [session.pk]})
    session.refresh_from_db()
    assert session.status == "open"
    assert list(Event.objects.filter(type="session.status_changed").values_list("payload", "actor")) == [
        ({"from": "open", "to": status}, admin_user.pk), ({"from": status, "to": "open"}, admin_user.pk)]
    assert services.participant_join(session_id=session.pk).session_id == session.pk


def test_changing_the_status_on_the_form_is_logged_too(admin_client: Client, admin_user) -> None:
    session = factories.session_create(capacity=10)
    url = reverse("admin:experiment_session_change", args=[session.pk])
    response = admin_client.post(url, {"experiment": session.experiment_id, "label": "x", "capacity": "10",
                                       "over_recruitment": "0", "status": "paused", "synthetic_fill_after": ""})
    assert response.status_code == 302, _page(response)[:3000]
    session.refresh_from_db()
    assert (session.status, session.label) == ("paused", "x")
    assert Event.objects.get(type="session.status_changed").actor == admin_user


def test_session_status_set_refuses_an_unknown_status_and_repeats_nothing() -> None:
    session = factories.session_create()
    with pytest.raises(RuleError, match="must be one of"):
        services.session_status_set(session_id=session.pk, status="gone", actor_id=None)
    services.session_status_set(session_id=session.pk, status="open", actor_id=None)
    assert not Event.objects.exists()
    session.refresh_from_db()
    assert session.status == "open"


def test_an_ended_session_cannot_reopen_recruitment(admin_client: Client) -> None:
    session = factories.session_create()
    services.session_end(session_id=session.pk, actor_id=None)
    response = admin_client.post(reverse("admin:experiment_session_changelist"),
                                 {"action": "recruitment_open", "_selected_action": [session.pk]}, follow=True)
    assert "its recruitment cannot reopen" in _page(response)
    session.refresh_from_db()
    assert session.status == "closed"
    assert not Event.objects.filter(type="session.status_changed").exists()


def test_the_session_list_counts_people_by_stage(admin_client: Client) -> None:
    session = factories.session_create(label="counted")
    people = [services.participant_join(session_id=session.pk) for _ in range(3)]
    services.consent_submit(participant_id=people[0].pk, accept=False)
    row = _page(admin_client.get(reverse("admin:experiment_session_changelist")))
    assert "3 / 21" in row
    page = _page(admin_client.get(reverse("admin:experiment_session_change", args=[session.pk])))
    assert "3 joined: 2 joining, 0 in lobby, 0 playing, 0 finished, 1 left" in page


def test_a_session_with_people_cannot_be_deleted(admin_client: Client) -> None:
    session = factories.session_create()
    services.participant_join(session_id=session.pk)
    assert admin_client.post(reverse("admin:experiment_session_delete", args=[session.pk]), {"post": "yes"}).status_code == 403
    assert Session.objects.filter(pk=session.pk).exists() and Participant.objects.exists()


# ---- game data is read-only ------------------------------------------------------------------------------

READ_ONLY = ["group", "participant", "message", "choice", "return", "roundpayoff", "belief", "questionnaireresponse",
             "event"]


@pytest.mark.parametrize("model", READ_ONLY)
def test_game_data_can_be_read_but_not_added(admin_client: Client, model: str) -> None:
    assert admin_client.get(f"/admin/experiment/{model}/").status_code == 200
    assert admin_client.get(f"/admin/experiment/{model}/add/").status_code == 403


def test_game_data_cannot_be_changed_or_deleted(admin_client: Client) -> None:
    session = factories.session_create()
    p = services.participant_join(session_id=session.pk)
    event = Event.objects.get(type="participant.joined")
    for url in (f"/admin/experiment/event/{event.pk}/change/", f"/admin/experiment/participant/{p.pk}/change/"):
        page = admin_client.get(url)
        assert page.status_code == 200 and 'name="_save"' not in page.content.decode()
        assert admin_client.post(url, {"type": "forged", "payoff": "999"}).status_code == 403
        assert admin_client.post(url.replace("/change/", "/delete/"), {"post": "yes"}).status_code == 403
    event.refresh_from_db()
    p.refresh_from_db()
    assert event.type == "participant.joined" and p.payoff == 0
    response = admin_client.post("/admin/experiment/event/", {"action": "delete_selected", "_selected_action": [event.pk]})
    assert Event.objects.filter(pk=event.pk).exists() and response.status_code in (200, 302)


def test_event_log_filters_by_session_and_type(admin_client: Client) -> None:
    one, two = factories.session_create(), factories.session_create()
    services.participant_join(session_id=one.pk)
    services.session_status_set(session_id=two.pk, status="paused", actor_id=None)
    rows = _results(admin_client.get(f"/admin/experiment/event/?session__id__exact={two.pk}"))
    assert "session.status_changed" in rows and "participant.joined" not in rows
    rows = _results(admin_client.get("/admin/experiment/event/?type=participant.joined"))
    assert "participant.joined" in rows and "session.status_changed" not in rows


def test_the_private_token_is_never_shown(admin_client: Client) -> None:
    session = factories.session_create()
    p = services.participant_join(session_id=session.pk, prolific_pid="PID7")
    listing = admin_client.get("/admin/experiment/participant/").content.decode()
    detail = admin_client.get(f"/admin/experiment/participant/{p.pk}/change/").content.decode()
    assert "PID7" in listing and "PID7" in detail
    assert p.token not in listing and p.token not in detail


# ---- who may open the admin -------------------------------------------------------------------------------

def _admin_urls() -> list[tuple[str, str]]:
    session = factories.session_create()
    p = services.participant_join(session_id=session.pk)
    experiment = session.experiment
    group_free = [("get", f"/admin/experiment/{model}/") for model in READ_ONLY]
    return [
        ("get", "/admin/"),
        ("get", reverse("admin:experiment_experiment_changelist")),
        ("get", reverse("admin:experiment_experiment_add")),
        ("get", reverse("admin:experiment_experiment_change", args=[experiment.pk])),
        ("post", reverse("admin:experiment_experiment_preset", args=["hidden"])),
        ("post", reverse("admin:experiment_experiment_changelist")),
        ("get", reverse("admin:experiment_session_changelist")),
        ("get", reverse("admin:experiment_session_add")),
        ("get", reverse("admin:experiment_session_change", args=[session.pk])),
        ("post", reverse("admin:experiment_session_changelist")),
        ("get", f"/admin/experiment/participant/{p.pk}/change/"),
        ("get", f"/admin/experiment/event/{Event.objects.first().pk}/change/"),
        *group_free,
    ]


def _assert_sent_to_login(client: Client, urls: list[tuple[str, str]]) -> None:
    for method, url in urls:
        response = getattr(client, method)(url, {"action": "recruitment_close", "_selected_action": ["1"]}
                                           if method == "post" else None)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/admin/login/"), (url, response["Location"])


def test_anonymous_visitors_are_sent_to_login(client: Client) -> None:
    urls = _admin_urls()
    _assert_sent_to_login(client, urls)
    assert Experiment.objects.count() == 1
    assert not Event.objects.filter(type="session.status_changed").exists()


def test_logged_in_people_who_are_not_staff_are_sent_to_login(client: Client) -> None:
    user = get_user_model().objects.create_user("someone", password="pw-not-staff-123")
    client.force_login(user)
    urls = _admin_urls()
    _assert_sent_to_login(client, urls)
    assert Experiment.objects.count() == 1
    assert Session.objects.get().status == "open"


def test_a_participant_token_does_not_open_the_admin(client: Client) -> None:
    session = factories.session_create()
    response = client.get(f"/join/{session.code}/")
    assert response.status_code == 302
    token = Participant.objects.get().token
    assert client.get(f"/play/{token}/").status_code == 200
    for url in ("/admin/", "/admin/experiment/participant/", f"/admin/experiment/participant/?q={token}",
                f"/admin/?token={token}", reverse("admin:experiment_session_change", args=[session.pk])):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/"), url
    response = client.post("/admin/login/", {"username": token, "password": token, "next": "/admin/"})
    assert response.status_code == 200 and "_auth_user_id" not in client.session
    assert not Choice.objects.exists()


def _zip_names(response) -> set[str]:
    import io
    import zipfile

    body = b"".join(response.streaming_content) if response.streaming else response.content
    return set(zipfile.ZipFile(io.BytesIO(body)).namelist())


def test_export_actions_on_sessions_and_experiments_download_the_bundle(admin_client: Client) -> None:
    session = factories.session_create(capacity=10)
    factories.people_onboard(session, 2)
    for url, pk in ((reverse("admin:experiment_session_changelist"), session.pk),
                    (reverse("admin:experiment_experiment_changelist"), session.experiment.pk)):
        for action in ("export_bundle", "export_bundle_pseudonymised"):
            response = admin_client.post(url, {"action": action, "_selected_action": [pk]})
            assert response.status_code == 200, (url, action)
            names = _zip_names(response)
            assert {"codebook.md", "codebook.json"} <= names
            assert any(name.endswith("choices.csv") for name in names)


def test_bonus_action_needs_one_session_and_gives_the_prolific_file(admin_client: Client) -> None:
    session = factories.session_create(capacity=10)
    other = factories.session_create(capacity=10)
    p = services.participant_join(session_id=session.pk, prolific_pid="PID42")
    Participant.objects.filter(pk=p.pk).update(payoff=150)
    url = reverse("admin:experiment_session_changelist")
    response = admin_client.post(url, {"action": "prolific_bonus", "_selected_action": [session.pk]})
    assert response.status_code == 200
    assert response.content.decode().strip() == "PID42,1.50"
    response = admin_client.post(url, {"action": "prolific_bonus", "_selected_action": [session.pk, other.pk]},
                                 follow=True)
    assert "Select exactly one session" in response.content.decode()
