"""The part of a game view that a group's seats share is read once per group version and kept per process.

These tests pin down when a kept part may be used: only for the exact version it was read at, never for
a newer one, and never when it was read inside a transaction (its rows may be uncommitted)."""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from experiment import services
from experiment.models import Participant
from experiment.selectors import group_parts, seat_state
from tests.experiment import gamekit

pytestmark = [pytest.mark.django_db(transaction=True)]
P = Participant
TWO_HUMAN_CANDIDATES = {"n_candidates": 3, "n_bot_candidates": 1}


def _uncached_state(participant_id: int) -> dict:
    group_parts.clear()
    return seat_state(participant_id)


def _same(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "server_time"} == {k: v for k, v in b.items() if k != "server_time"}


def test_seats_of_one_version_share_one_read_and_see_what_they_would_see_alone() -> None:
    group = gamekit.group_start(**TWO_HUMAN_CANDIDATES)
    gamekit.pitch_all(group)
    people = gamekit.people(group)
    alone = {p.pk: _uncached_state(p.pk) for p in people}
    group_parts.clear()
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
    reads = []
    real = selectors._read_group_part

    def slow_read(g):
        reads.append(g.pk)
        time.sleep(0.2)  # long enough for every other thread to arrive while this one reads
        return real(g)

    monkeypatch.setattr(selectors, "_read_group_part", slow_read)
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
    monkeypatch.setattr(selectors, "_read_group_part", real)
    for p in people:
        assert _same(states[p.pk], _uncached_state(p.pk))
