"""The experimenter cockpit: staff-only pages, live monitor updates, and every monitor action."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.utils import timezone

from config.asgi import application
from experiment import services
from experiment.models import Event, Group, Participant
from experiment.selectors import seat_state
from tests import factories

P = Participant


@pytest.fixture
def staff(db):
    return get_user_model().objects.create_user("boss", password="pw-boss-123", is_staff=True)


@pytest.fixture
def game(db):
    experiment = factories.experiment_create(n_rounds=2, **factories.FAST)
    session = factories.session_create(experiment, capacity=10)
    group = factories.group_start(session)
    return session, group


def _people(group: Group) -> list[Participant]:
    return list(group.participants.filter(controller=P.Controller.PERSON).order_by("seat"))


# ---- permissions ------------------------------------------------------------------------------------------

def _urls(session, group, person) -> list[tuple[str, str]]:
    return [
        ("get", "/cockpit/"), ("get", f"/cockpit/sessions/{session.pk}/"),
        ("get", f"/cockpit/sessions/{session.pk}/payments/"), ("get", f"/cockpit/sessions/{session.pk}/spend/"),
        ("post", f"/cockpit/groups/{group.pk}/pause/"), ("post", f"/cockpit/groups/{group.pk}/close-phase/"),
        ("post", f"/cockpit/participants/{person.pk}/remove/"), ("post", f"/cockpit/sessions/{session.pk}/end/"),
    ]


@pytest.mark.django_db(transaction=True)
def test_cockpit_refuses_anonymous_participants_and_non_staff(client, game) -> None:
    session, group = game
    person = _people(group)[0]
    get_user_model().objects.create_user("someone", password="pw-someone-123")
    for method, url in _urls(session, group, person):
        response = getattr(client, method)(url)
        assert response.status_code == 302 and "/admin/login/" in response["Location"], url
    # A participant who has the game page open (and its cookie) gets no further.
    client.get(f"/play/{person.token}/")
    for method, url in _urls(session, group, person):
        assert getattr(client, method)(url).status_code == 302, url
    client.login(username="someone", password="pw-someone-123")
    for method, url in _urls(session, group, person):
        assert getattr(client, method)(url).status_code == 302, url
    assert not Event.objects.filter(type__in=["group.paused", "participant.removed", "session.ended"]).exists()
    assert Group.objects.get(pk=group.pk).paused_at is None


@pytest.mark.django_db(transaction=True)
def test_staff_pages_render(client, staff, game) -> None:
    session, _group = game
    client.force_login(staff)
    for url in ("/cockpit/", f"/cockpit/sessions/{session.pk}/", f"/cockpit/sessions/{session.pk}/payments/",
                f"/cockpit/sessions/{session.pk}/spend/"):
        response = client.get(url)
        assert response.status_code == 200, url
    payments = client.get(f"/cockpit/sessions/{session.pk}/payments/").content.decode()
    assert payments.count("<tr>") >= 1 + session.experiment.n_humans


# ---- actions ----------------------------------------------------------------------------------------------

def _post(client, url: str) -> dict:
    response = client.post(url)
    return {"status": response.status_code, **json.loads(response.content)}


@pytest.mark.django_db(transaction=True)
def test_pause_stops_the_clock_and_resume_restarts_it(client, staff, game) -> None:
    _session, group = game
    client.force_login(staff)
    selector = next(p for p in _people(group) if p.role == "selector")
    assert _post(client, f"/cockpit/groups/{group.pk}/pause/")["ok"]
    group.refresh_from_db()
    assert group.paused_at is not None and group.phase_deadline is None and group.paused_remaining > 0
    # Nobody can act while paused, and the sweep does not close the phase.
    with pytest.raises(services.RuleError) as err:
        services.pitch_submit(participant_id=_people(group)[-1].pk if _people(group)[-1].role == "candidate" else
                              next(p for p in _people(group) if p.role == "candidate").pk, round_number=1, text="hi")
    assert err.value.code == "paused"
    services.sweep(now=timezone.now() + timedelta(hours=1))
    group.refresh_from_db()
    assert (group.round_number, group.phase) == (1, "pitch")
    assert _post(client, f"/cockpit/groups/{group.pk}/pause/")["code"] == "already_paused"
    assert _post(client, f"/cockpit/groups/{group.pk}/resume/")["ok"]
    group.refresh_from_db()
    assert group.paused_at is None and group.phase_deadline > timezone.now()
    assert _post(client, f"/cockpit/groups/{group.pk}/resume/")["code"] == "not_paused"
    kinds = list(Event.objects.filter(group=group, type__in=["group.paused", "group.resumed"]).values_list("type", "actor_id"))
    assert kinds == [("group.paused", staff.pk), ("group.resumed", staff.pk)]
    assert seat_state(selector.pk)["game"]["phase"] == "pitch"


@pytest.mark.django_db(transaction=True)
def test_close_phase_now_applies_defaults(client, staff, game) -> None:
    _session, group = game
    client.force_login(staff)
    assert _post(client, f"/cockpit/groups/{group.pk}/close-phase/")["ok"]
    group.refresh_from_db()
    assert (group.round_number, group.phase) == (1, "choice")
    assert group.messages.filter(round_number=1, timed_out=True).count() == 4
    event = Event.objects.get(group=group, type="phase.closed_by_staff")
    assert event.actor_id == staff.pk


@pytest.mark.django_db(transaction=True)
def test_remove_and_replace_participants(client, staff, game) -> None:
    _session, group = game
    client.force_login(staff)
    people = _people(group)
    candidate = next(p for p in people if p.role == "candidate")
    selector = next(p for p in people if p.role == "selector")
    assert _post(client, f"/cockpit/participants/{candidate.pk}/remove/")["ok"]
    candidate.refresh_from_db()
    assert candidate.status == P.Status.DROPPED and candidate.controller == P.Controller.PERSON
    # The removed candidate's pitch was defaulted at once, so nobody waits for them.
    assert group.messages.get(candidate=candidate, round_number=1).timed_out
    assert seat_state(candidate.pk)["stage"] == "dropped"
    assert _post(client, f"/cockpit/participants/{candidate.pk}/remove/")["code"] == "not_active"

    assert _post(client, f"/cockpit/participants/{selector.pk}/replace/")["ok"]
    selector.refresh_from_db()
    assert selector.status == P.Status.DROPPED and selector.controller == P.Controller.SCRIPTED
    events = list(Event.objects.filter(participant__in=[candidate, selector], actor=staff).values_list("type", flat=True))
    assert events == ["participant.removed", "participant.removed", "seat.takeover"]
    bot = Participant.objects.filter(group=group, kind=P.Kind.BOT).first()
    assert _post(client, f"/cockpit/participants/{bot.pk}/remove/")["code"] == "not_a_person"


@pytest.mark.django_db(transaction=True)
def test_end_session_resolves_every_phase_and_sends_everyone_to_the_end(client, staff, game) -> None:
    session, group = game
    client.force_login(staff)
    waiting = factories.people_onboard(session, 2)  # in the lobby, not enough for a second group
    assert _post(client, f"/cockpit/sessions/{session.pk}/end/")["ok"]
    group.refresh_from_db()
    session.refresh_from_db()
    assert group.status == Group.Status.FINISHED and session.ended_at and session.status == "closed"
    assert group.choices.count() == 3 * 2 and group.choices.filter(timed_out=True).count() == 6
    assert all(seat_state(p.pk)["stage"] == "finished" for p in _people(group))
    assert all(seat_state(pk)["stage"] == "finished" for pk in waiting)
    assert Event.objects.filter(type="session.ended", actor=staff).count() == 1
    assert Event.objects.filter(type="participant.ended_by_staff").count() == session.experiment.n_humans + 2
    # Ending twice is refused; nothing was dropped for "timeouts" the staff caused.
    assert _post(client, f"/cockpit/sessions/{session.pk}/end/")["code"] == "already_ended"
    assert not Participant.objects.filter(session=session, status=P.Status.DROPPED).exists()


# ---- live monitor -----------------------------------------------------------------------------------------

async def _monitor(client, session_id: int) -> WebsocketCommunicator:
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    comm = WebsocketCommunicator(application, f"/ws/monitor/{session_id}/",
                                 headers=[(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1"), (b"cookie", cookie)])
    connected, _ = await comm.connect()
    assert connected
    return comm


@pytest.mark.django_db(transaction=True)
async def test_monitor_gets_live_updates_when_participants_act(client, staff) -> None:
    experiment = await database_sync_to_async(factories.experiment_create)(n_rounds=1, **factories.FAST)
    session = await database_sync_to_async(factories.session_create)(experiment, capacity=10)
    await database_sync_to_async(factories.group_start)(session)
    await database_sync_to_async(client.force_login)(staff)
    comm = await _monitor(client, session.pk)
    state = json.loads(await comm.receive_from(timeout=5))
    assert state["type"] == "monitor.state"
    [g] = state["groups"]
    assert (g["round"], g["phase"], len(g["seats"])) == (1, "pitch", 7)
    assert {s["status"] for s in g["seats"] if s["kind"] == "bot"} == {"bot"}
    candidate = next(s for s in g["seats"] if s["role"] == "candidate" and s["controller"] == "person")
    assert candidate["status"] == "offline"

    await database_sync_to_async(services.pitch_submit)(participant_id=candidate["id"], round_number=1, text="hello")
    update = json.loads(await comm.receive_from(timeout=5))
    assert update["type"] == "monitor.group"
    seat = next(s for s in update["group"]["seats"] if s["id"] == candidate["id"])
    assert seat["status"] == "submitted"
    await comm.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_monitor_socket_refuses_non_staff(client) -> None:
    experiment = await database_sync_to_async(factories.experiment_create)()
    session = await database_sync_to_async(factories.session_create)(experiment)
    comm = WebsocketCommunicator(application, f"/ws/monitor/{session.pk}/",
                                 headers=[(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1")])
    connected, _code = await comm.connect()
    assert not connected
    # Let the refused consumer finish, or its pending channel-layer receive outlives the test's event loop.
    await comm.disconnect()


def test_redirect_follows_the_outcome() -> None:
    from experiment.selectors import _redirect_for

    url = "https://app.prolific.com/submissions/complete?cc=DONE1"
    assert _redirect_for(url, "DONE1", "DONE1") == url
    assert _redirect_for(url, "DONE1", "LOBBY9") == "https://app.prolific.com/submissions/complete?cc=LOBBY9"
    assert _redirect_for("https://example.org/thanks", "DONE1", "LOBBY9") == ""
    assert _redirect_for(url, "DONE1", "") == ""


@pytest.mark.django_db(transaction=True)
def test_monitor_page_embeds_the_live_preference_shift_chart(client, staff, game) -> None:
    session, _group = game
    client.force_login(staff)
    page = client.get(f"/cockpit/sessions/{session.pk}/").content.decode()
    chart = f"/staff/sessions/{session.pk}/summary.svg"
    assert f'src="{chart}"' in page
    response = client.get(chart)
    assert response.status_code == 200
    body = b"".join(response.streaming_content) if response.streaming else response.content
    assert b"<svg" in body


@pytest.mark.django_db(transaction=True)
def test_monitor_seat_status_distinguishes_submitted_from_waiting(game) -> None:
    from experiment.monitor import group_summary_by_id

    _session, group = game
    summary = group_summary_by_id(group.pk)
    person_selectors = [s for s in summary["seats"] if s["role"] == "selector" and s["controller"] == "person"]
    # In the pitch phase selectors have nothing to do: they wait (offline here: no browser is open).
    assert person_selectors and {s["status"] for s in person_selectors} == {"offline"}
    candidate = next(p for p in _people(group) if p.role == "candidate")
    services.pitch_submit(participant_id=candidate.pk, round_number=1, text="hello")
    seat = next(s for s in group_summary_by_id(group.pk)["seats"] if s["id"] == candidate.pk)
    assert seat["status"] == "submitted"
