"""Seat views are built on threads of their own, never queued behind actions on the database threads."""

from __future__ import annotations

import threading

import pytest

from experiment import consumers
from experiment.models import Participant
from tests.experiment import gamekit
from tests.wsclient import Seat

pytestmark = [pytest.mark.django_db(transaction=True)]
executor_connections_closed = gamekit.executor_connections_closed
P = Participant


async def test_views_run_on_the_view_threads_and_actions_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    group = await gamekit.db(gamekit.group_start)(**gamekit.SMALL)
    candidate = (await gamekit.db(gamekit.people)(group, P.Role.CANDIDATE))[0]
    views, actions_ = [], []
    real_view, real_dispatch = consumers.seat_state, consumers.actions.dispatch

    def view(participant_id: int, **kwargs):
        views.append(threading.current_thread().name)
        return real_view(participant_id, **kwargs)

    def dispatch(participant_id: int, message: object, **kwargs):
        actions_.append(threading.current_thread().name)
        return real_dispatch(participant_id, message, **kwargs)

    monkeypatch.setattr(consumers, "seat_state", view)
    monkeypatch.setattr(consumers.actions, "dispatch", dispatch)
    seat = await Seat(candidate.token).connect()
    reply = await seat.send({"type": "pitch.submit", "round": 1, "text": "I return half."})
    assert reply["type"] == "ack", reply
    await seat.until(lambda s: s["game"]["my_message"] is not None)  # the refreshed view, not the progress
    await seat.close()
    assert len(views) >= 2 and all(name.startswith("web-views") for name in views), views
    assert actions_ and not any(name.startswith("web-views") for name in actions_), actions_
