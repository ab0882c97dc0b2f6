"""The participant pages: the join link (recruitment ids, returning people, full or closed sessions,
the seat cookie) and the game page."""

from __future__ import annotations

import pytest
from django.test import Client

from experiment import services
from experiment.models import Participant, Session
from tests import factories
from tests.experiment import gamekit

pytestmark = [pytest.mark.django_db]
P = Participant


@pytest.fixture
def session() -> Session:
    return factories.session_create(gamekit.experiment_small(), capacity=3)


def _join(client: Client, session: Session, **query: str):
    return client.get(f"/join/{session.code}/", query)


def _token_of(response) -> str:
    assert response.status_code == 302, response.status_code
    location = response["Location"]
    assert location.startswith("/play/") and location.endswith("/")
    return location.removeprefix("/play/").rstrip("/")


def test_the_join_link_stores_the_recruitment_ids(client: Client, session: Session) -> None:
    pid = "5f1d2c3b4a5e6f7a8b9c0d1e"
    token = _token_of(_join(client, session, PROLIFIC_PID=pid, STUDY_ID="study-42", SESSION_ID="sess_7.a"))
    p = Participant.objects.get(token=token)
    assert (p.prolific_pid, p.study_id, p.recruitment_session_id) == (pid, "study-42", "sess_7.a")
    assert (p.session_id, p.status, p.controller) == (session.pk, P.Status.CONSENT, P.Controller.PERSON)
    page = client.get(f"/play/{token}/")
    assert page.status_code == 200
    assert f"/ws/play/{token}/".encode() in page.content


def test_the_join_link_without_recruitment_ids(client: Client, session: Session) -> None:
    p = Participant.objects.get(token=_token_of(_join(client, session)))
    assert (p.prolific_pid, p.study_id, p.recruitment_session_id) == ("", "", "")


def test_the_same_prolific_pid_gets_the_same_seat_back(session: Session) -> None:
    first = _token_of(_join(Client(), session, PROLIFIC_PID="PID1"))
    # Another browser (no cookie), even after the session filled up and closed.
    _join(Client(), session, PROLIFIC_PID="PID2")
    _join(Client(), session, PROLIFIC_PID="PID3")
    Session.objects.filter(pk=session.pk).update(status=Session.Status.CLOSED)
    assert _token_of(_join(Client(), session, PROLIFIC_PID="PID1")) == first
    assert Participant.objects.filter(session=session, prolific_pid="PID1").count() == 1
    assert Participant.objects.filter(session=session).count() == 3


def test_the_same_prolific_pid_in_another_session_is_another_person(session: Session) -> None:
    other = factories.session_create(session.experiment, capacity=3)
    a = _token_of(_join(Client(), session, PROLIFIC_PID="PID1"))
    b = _token_of(_join(Client(), other, PROLIFIC_PID="PID1"))
    assert a != b


@pytest.mark.parametrize(("field", "value"), [
    ("PROLIFIC_PID", "x" * 65), ("STUDY_ID", "y" * 65), ("SESSION_ID", "z" * 65),
    ("PROLIFIC_PID", "<script>alert(1)</script>"), ("PROLIFIC_PID", "a b"), ("PROLIFIC_PID", "a'b"),
    ("PROLIFIC_PID", 'a"b'), ("PROLIFIC_PID", "a/b"), ("PROLIFIC_PID", "a\x00b"), ("STUDY_ID", "{{ 7*7 }}"),
    ("SESSION_ID", "a;DROP TABLE"), ("PROLIFIC_PID", "ab\u202ecd"), ("PROLIFIC_PID", "\u0430dmin"),
    ("PROLIFIC_PID", "é"), ("PROLIFIC_PID", "²"),
], ids=lambda v: repr(v)[:20])
def test_invalid_recruitment_ids_are_refused(client: Client, session: Session, field: str, value: str) -> None:
    response = _join(client, session, **{field: value})
    assert response.status_code == 403
    assert field.encode() in response.content and b"letters, digits" in response.content
    assert not Participant.objects.exists()
    assert not any(name.startswith("partnerlab_seat") for name in response.cookies)


def test_the_longest_valid_recruitment_id_is_accepted(client: Client, session: Session) -> None:
    token = _token_of(_join(client, session, PROLIFIC_PID="a" * 64))
    assert Participant.objects.get(token=token).prolific_pid == "a" * 64


def test_a_full_session_shows_a_clear_page(session: Session) -> None:
    for i in range(3):
        _token_of(_join(Client(), session, PROLIFIC_PID=f"P{i}"))
    response = _join(Client(), session, PROLIFIC_PID="late")
    assert response.status_code == 403
    assert b"This study is full" in response.content
    assert Participant.objects.filter(session=session).count() == 3


@pytest.mark.parametrize("status", [Session.Status.CLOSED, Session.Status.PAUSED])
def test_a_closed_or_paused_session_shows_a_clear_page(client: Client, session: Session, status: str) -> None:
    Session.objects.filter(pk=session.pk).update(status=status)
    response = _join(client, session)
    assert response.status_code == 403
    assert b"not accepting participants" in response.content
    assert not Participant.objects.exists()


def test_an_unknown_session_code_is_404(client: Client) -> None:
    assert client.get("/join/no-such-code/").status_code == 404


def test_the_play_page_for_an_unknown_token_is_404(client: Client, session: Session) -> None:
    assert client.get("/play/no-such-token/").status_code == 404


def test_the_play_page_of_a_bot_seat_is_404(client: Client) -> None:
    group = gamekit.group_start()
    bot = Participant.objects.get(group=group, kind=P.Kind.BOT)
    assert client.get(f"/play/{bot.token}/").status_code == 404


def test_the_join_cookie_resumes_the_same_participant(client: Client, session: Session) -> None:
    first = _token_of(_join(client, session))
    assert _token_of(_join(client, session)) == first
    assert _token_of(_join(client, session, PROLIFIC_PID="ignored-for-a-known-browser")) == first
    assert Participant.objects.filter(session=session).count() == 1
    # Another browser gets another seat.
    assert _token_of(_join(Client(), session)) != first


def test_the_join_cookie_belongs_to_one_session(client: Client, session: Session) -> None:
    other = factories.session_create(session.experiment, capacity=3)
    a, b = _token_of(_join(client, session)), _token_of(_join(client, other))
    assert a != b
    assert _token_of(_join(client, session)) == a and _token_of(_join(client, other)) == b


def test_a_forged_join_cookie_is_ignored(client: Client, session: Session) -> None:
    victim = services.participant_join(session_id=session.pk)
    client.cookies[f"partnerlab_seat_{session.code}"] = victim.token  # unsigned: not from us
    assert _token_of(_join(client, session)) != victim.token
    assert Participant.objects.filter(session=session).count() == 2


def test_join_and_play_accept_only_get(client: Client, session: Session) -> None:
    assert client.post(f"/join/{session.code}/").status_code == 405
    assert not Participant.objects.exists()


def test_a_person_whose_seat_a_bot_took_over_can_reload_the_page(client: Client) -> None:
    group = gamekit.group_start(dropout_after=1, dropout_policy="bot")
    human = gamekit.people(group, P.Role.CANDIDATE)[0]
    gamekit.deadline_pass(group)
    human.refresh_from_db()
    assert human.controller == P.Controller.SCRIPTED
    assert client.get(f"/play/{human.token}/").status_code == 200
