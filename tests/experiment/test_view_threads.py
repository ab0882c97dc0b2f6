"""Seat views are built on threads of their own, never queued behind actions on the database threads."""

from __future__ import annotations

import asyncio
import threading

import pytest
from channels.layers import get_channel_layer

from experiment import consumers, events
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
    seat = await Seat(candidate.token).connect()  # the view on connect
    reply = await seat.send({"type": "pitch.submit", "round": 1, "text": "I return half."})
    assert reply["type"] == "ack", reply
    # The actor's own view after the action is built by the action (under the group's lock) and only sent.
    await seat.until(lambda s: s["game"]["my_message"] is not None)
    # A refresh asks the connection to read the view itself.
    before = len(views)
    await get_channel_layer().group_send(events.seat_channel(candidate.pk), {"type": "seat.refresh"})
    for _ in range(100):
        if len(views) > before:
            break
        await asyncio.sleep(0.05)
    await seat.close()
    assert len(views) >= 2 and all(name.startswith("web-views") for name in views), views
    assert actions_ and not any(name.startswith("web-views") for name in actions_), actions_
