"""The parts of a game view that a group's seats share are read once and kept per process: what is fixed for
a phase per (group, round, phase), the progress per group version.

These tests pin down when a kept part may be used: only for the exact phase or version it was read at,
never for a newer one, and never when it was read inside a transaction (its rows may be uncommitted)."""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from experiment import services
from experiment.models import Participant
from experiment.selectors import clear_kept, seat_state
from tests.experiment import gamekit

pytestmark = [pytest.mark.django_db(transaction=True)]
P = Participant
TWO_HUMAN_CANDIDATES = {"n_candidates": 3, "n_bot_candidates": 1}


def _uncached_state(participant_id: int) -> dict:
    clear_kept()
    return seat_state(participant_id)


def _same(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "server_time"} == {k: v for k, v in b.items() if k != "server_time"}


def test_seats_of_one_version_share_one_read_and_see_what_they_would_see_alone() -> None:
    group = gamekit.group_start(**TWO_HUMAN_CANDIDATES)
    gamekit.pitch_all(group)
    people = gamekit.people(group)
    alone = {p.pk: _uncached_state(p.pk) for p in people}
    clear_kept()
    with CaptureQueriesContext(connection) as first:
        seat_state(people[0].pk)
    with CaptureQueriesContext(connection) as second:
        seat_state(people[1].pk)
    assert len(second) < len(first)  # the shared part came from the cache
    for p in people:
        assert _same(seat_state(p.pk), alone[p.pk])


def test_a_newer_version_is_read_afresh() -> None:
    group = gamekit.group_start(**TWO_HUMAN_CANDIDATES)
    candidate = gamekit.people(group, P.Role.CANDIDATE)[0]
    selector = gamekit.people(group, P.Role.SELECTOR)[0]
    before = seat_state(selector.pk)
    services.pitch_submit(participant_id=candidate.pk, round_number=1, text="I return half")
    after = seat_state(selector.pk)
    assert after["version"] > before["version"]
    assert after["game"]["progress"]["done"] == before["game"]["progress"]["done"] + 1
    assert _same(after, _uncached_state(selector.pk))


def test_a_view_read_inside_a_transaction_is_not_kept() -> None:
    group = gamekit.group_start(**TWO_HUMAN_CANDIDATES)
    candidate = gamekit.people(group, P.Role.CANDIDATE)[0]
    selector = gamekit.people(group, P.Role.SELECTOR)[0]

    class Undo(Exception):
        pass

    with pytest.raises(Undo), transaction.atomic():
        services.pitch_submit(participant_id=candidate.pk, round_number=1, text="never happened")
        inside = seat_state(selector.pk)
        assert inside["game"]["progress"]["done"] == 1
        raise Undo
    # The rolled-back pitch bumped the version to the number the next real action will use again.
    other = gamekit.people(group, P.Role.CANDIDATE)[1]
    services.pitch_submit(participant_id=other.pk, round_number=1, text="a real pitch")
    state = seat_state(candidate.pk)
    assert state["version"] == inside["version"]
    assert state["game"]["my_message"] is None  # the undone pitch is not shown from a kept part
    assert _same(state, _uncached_state(candidate.pk))


def test_seats_asking_at_the_same_moment_wait_for_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    from django.db import connections

    from experiment import selectors

    group = gamekit.group_start(**TWO_HUMAN_CANDIDATES)
    clear_kept()  # forming the group kept what its views share: start without it
    reads = []
    real = selectors._read_phase_part

    def slow_read(g):
        reads.append(g.pk)
        time.sleep(0.2)  # long enough for every other thread to arrive while this one reads
        return real(g)

    monkeypatch.setattr(selectors, "_read_phase_part", slow_read)
    people = gamekit.people(group)
    states, problems = {}, []

    def ask(pk: int) -> None:
        try:
            states[pk] = seat_state(pk)
        except Exception as exc:  # pragma: no cover - reported below
            problems.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=ask, args=(p.pk,)) for p in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not problems and len(states) == len(people)
    assert reads == [group.pk]
    monkeypatch.setattr(selectors, "_read_phase_part", real)
    for p in people:
        assert _same(states[p.pk], _uncached_state(p.pk))


def _fresh_state(participant_id: int) -> dict:
    """The view read without kept parts: inside a transaction nothing kept is used (nor kept)."""
    with transaction.atomic():
        return seat_state(participant_id)


def test_kept_views_equal_fresh_views_after_every_action_of_a_whole_game() -> None:
    import random

    from bots.synthetic import SyntheticHuman
    from experiment import actions

    group = gamekit.group_start(**TWO_HUMAN_CANDIDATES)
    people = [p.pk for p in gamekit.people(group)]
    human = SyntheticHuman()
    rng = random.Random(3)
    compared, phases = 0, set()
    while gamekit.fresh(group).status == group.Status.PLAYING:
        acted = False
        for pk in people:
            for message in human.decide(seat_state(pk), rng):
                actions.dispatch(pk, message)
                acted = True
                phases.add(gamekit.at(group)[1])
                for other in people:  # the kept phase part was read before this action, in the same phase
                    assert _same(seat_state(other), _fresh_state(other)), (gamekit.at(group), other)
                    compared += 1
        if gamekit.run_seat_jobs() == 0 and not acted:
            gamekit.deadline_pass(group)
    assert compared > 30 and {"pitch", "choice", "return", "feedback", "belief"} <= phases


def test_within_a_phase_an_action_rereads_nothing_shared() -> None:
    """The phase part stays; the progress of the new version is handed over by the action that made it."""
    group = gamekit.group_start(**TWO_HUMAN_CANDIDATES)
    gamekit.pitch_all(group)  # choice phase: the round's messages are part of every view
    selectors_ = gamekit.people(group, P.Role.SELECTOR)
    seat_state(selectors_[1].pk)
    with CaptureQueriesContext(connection) as kept:
        seat_state(selectors_[1].pk)
    services.choice_submit(participant_id=selectors_[0].pk, round_number=1,
                           candidate=seat_state(selectors_[0].pk)["game"]["candidates"][0]["seat"], amount=5)
    with CaptureQueriesContext(connection) as after_action:
        state = seat_state(selectors_[1].pk)
    assert state["game"]["progress"]["done"] == 1
    assert len(after_action) == len(kept)
    assert _same(state, _fresh_state(selectors_[1].pk))


def test_a_progress_handed_over_inside_a_rolled_back_transaction_is_not_kept() -> None:
    group = gamekit.group_start(**TWO_HUMAN_CANDIDATES)
    candidates = gamekit.people(group, P.Role.CANDIDATE)

    class Undo(Exception):
        pass

    with pytest.raises(Undo), transaction.atomic():
        services.pitch_submit(participant_id=candidates[0].pk, round_number=1, text="never happened")
        raise Undo
    state = seat_state(candidates[1].pk)
    assert state["game"]["progress"]["done"] == 0
    services.pitch_submit(participant_id=candidates[1].pk, round_number=1, text="a real pitch")
    assert seat_state(candidates[0].pk)["game"]["progress"]["done"] == 1
    assert _same(seat_state(candidates[0].pk), _fresh_state(candidates[0].pk))


def test_the_views_sent_by_the_lock_holder_are_the_views_people_would_read_themselves(monkeypatch: pytest.MonkeyPatch) -> None:
    """At a phase change (and at the end) the lock holder builds every person's view once and sends those
    instead of asking the group to look again; after an action within a phase, the actor's own. Each must
    equal the person's own fresh read, in every phase, after actions, bots' actions and deadlines alike, for
    people who play, who timed out and who dropped."""
    import random

    from bots.synthetic import SyntheticHuman
    from experiment import actions, events

    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(events, "_send_now", lambda channel, message: sent.append((channel, message)))
    group = gamekit.group_start(**TWO_HUMAN_CANDIDATES, dropout_after=2)
    sent.clear()  # forming the group refreshes each person's own seat; they join the group's channel then
    people = [p.pk for p in gamekit.people(group)]
    idle = people[-1]  # never acts: times out, then drops out
    human = SyntheticHuman()
    rng = random.Random(5)
    checked, phases, stages, own = 0, set(), set(), set()

    def check() -> None:
        nonlocal checked
        for channel, message in sent:
            assert message["type"] != "seat.refresh" or channel != events.group_channel(group.pk)
            if message["type"] == "seat.states":
                if channel == events.group_channel(group.pk):  # a phase change: everybody's
                    assert set(message["states"]) == {str(pk) for pk in people}
                else:  # an action within a phase: the actor's own
                    assert [channel] == [events.seat_channel(int(pk)) for pk in message["states"]]
                    own.add(int(next(iter(message["states"]))))
                for pk, state in message["states"].items():
                    assert _same(state, _fresh_state(int(pk))), (gamekit.at(group), pk)
                    assert _same(state, _uncached_state(int(pk)))
                    phases.add(state.get("game", {}).get("phase"))
                    stages.add(state["stage"])
                    checked += 1
        sent.clear()

    while gamekit.fresh(group).status == group.Status.PLAYING:
        acted = False
        for pk in people:
            if pk == idle:
                continue
            for message in human.decide(seat_state(pk), rng):
                actions.dispatch(pk, message)
                acted = True
                check()
        ran = gamekit.run_seat_jobs()
        check()
        if ran == 0 and not acted:
            gamekit.deadline_pass(group)
            check()
    assert {"pitch", "choice", "return", "feedback", "belief", None} <= phases
    assert {"playing", "dropped", "questionnaire"} <= stages
    assert checked > 20
    assert own == set(people) - {idle}


def test_before_the_lobby_each_step_sends_the_view_the_person_would_read_themselves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Consent, instructions and a wrong quiz change one person alone: their new view is built from the row the
    service locked and sent to their seat (no read by their connection), and equals a fresh read."""
    from experiment import actions, events
    from tests import factories

    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(events, "_send_now", lambda channel, message: sent.append((channel, message)))
    session = factories.session_create(gamekit.experiment_small(), capacity=5)
    right = factories.quiz_answers(session.experiment)
    steps = [{"type": "consent", "accept": True}, {"type": "instructions.done"},
             {"type": "quiz.submit", "answers": {k: "not an option" for k in right}}]
    person, declines = (services.participant_join(session_id=session.pk).pk for _ in range(2))
    stages = []
    for pk, message in [*((person, step) for step in steps), (declines, {"type": "consent", "accept": False})]:
        sent.clear()
        actions.dispatch(pk, message)
        views = [m for channel, m in sent if channel == events.seat_channel(pk)]
        assert [m["type"] for m in views] == ["seat.states"], sent
        state = views[0]["states"][str(pk)]
        assert _same(state, seat_state(pk))
        stages.append(state["stage"])
    assert stages == ["instructions", "quiz", "quiz", "declined"]
    assert seat_state(person)["quiz"]["attempts"] == 1
    # The right answers enter the lobby (its views: test_the_lobby_sends_the_views_people_would_read_themselves).
    sent.clear()
    actions.dispatch(person, {"type": "quiz.submit", "answers": right})
    [lobby_view] = [m["states"][str(person)] for channel, m in sent if channel == events.seat_channel(person)]
    assert lobby_view["stage"] == "lobby" and _same(lobby_view, seat_state(person))


@pytest.mark.parametrize("fill_after", [None, 30])
def test_the_lobby_sends_the_views_people_would_read_themselves(monkeypatch: pytest.MonkeyPatch, fill_after: int | None) -> None:
    """Entering the lobby sends the newcomer their view and everybody waiting theirs (the count changed); forming
    a group sends each of its people their first view of the game on their own channel. All are built under the
    session's lock, and each equals the person's own fresh read."""
    from experiment import events
    from tests import factories

    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(events, "_send_now", lambda channel, message: sent.append((channel, message)))
    session = factories.session_create(gamekit.experiment_small(), capacity=20, synthetic_fill_after=fill_after)
    lobby = events.lobby_channel(session.pk)
    n = session.experiment.n_humans
    people: list[int] = []
    for i in range(n + 2):
        person = services.participant_join(session_id=session.pk).pk
        services.consent_submit(participant_id=person, accept=True)
        services.instructions_done(participant_id=person)
        sent.clear()
        services.quiz_submit(participant_id=person, answers=factories.quiz_answers(session.experiment))
        people.append(person)
        # (A new group's channel is asked to look again too: nobody follows it before their first view of the game.)
        assert not [c for c, m in sent if m["type"] == "seat.refresh" and not c.startswith("group-")], sent
        own = [m["states"] for channel, m in sent if channel == events.seat_channel(person)]
        assert [list(states) for states in own] == [[str(person)]]
        assert _same(own[0][str(person)], seat_state(person))
        waiting = [m for channel, m in sent if channel == lobby]
        if i + 1 == n:  # the group formed: each of its people got their game, nobody is left waiting
            assert waiting == []
            for pk in people:
                views = [m["states"][str(pk)] for channel, m in sent if channel == events.seat_channel(pk)]
                assert len(views) == 1 and views[0]["stage"] == "playing" and _same(views[0], seat_state(pk))
        else:
            [message] = waiting
            assert message["partial"] and set(message["states"]) == {str(pk) for pk in people[n if i >= n else 0:]}
            for pk, state in message["states"].items():
                assert state["stage"] == "lobby" and _same(state, seat_state(int(pk)))
