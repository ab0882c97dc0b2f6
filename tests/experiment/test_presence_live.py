"""A web process killed with SIGKILL: the seats it served show offline after the staleness window.

The production stack of test_production_stack.py (two uvicorn processes, a Celery worker with beat, PostgreSQL,
Redis) with a short heartbeat and staleness limit. One participant is connected to each web process; the first
process is killed (its disconnects never run), and the beat's sweep must then count that seat offline while the
seat on the living process stays connected.
"""

from __future__ import annotations

import asyncio
import time
from unittest.mock import ANY

import pytest

from experiment.models import Event, Participant, SeatConnection
from tests import factories
from tests.experiment.gamekit import db
from tests.experiment.test_production_stack import Stack, _join_over_http, stack, static_root  # noqa: F401
from tests.livestack import LiveSeat

pytestmark = [pytest.mark.production_stack, pytest.mark.django_db(transaction=True)]

HEARTBEAT_SECONDS, STALE_SECONDS = 0.5, 3


@db
def _presence(token: str) -> tuple[int, int]:
    p = Participant.objects.get(token=token)
    return p.connections, SeatConnection.objects.filter(participant=p).count()


@db
def _lost_events() -> list[tuple[str, dict]]:
    return [(e.participant.token, e.payload) for e in Event.objects.filter(type="participant.disconnected")]


async def _until(token: str, want: tuple[int, int], timeout: float) -> None:
    end = time.monotonic() + timeout
    while (now := await _presence(token)) != want:
        assert time.monotonic() < end, f"presence stayed {now}, not {want}"
        await asyncio.sleep(0.2)


def test_the_seats_of_a_killed_web_process_go_offline(stack: Stack) -> None:  # noqa: F811
    stack.env.update(PARTNERLAB_PRESENCE_HEARTBEAT_SECONDS=str(HEARTBEAT_SECONDS),
                     PARTNERLAB_PRESENCE_STALE_SECONDS=str(STALE_SECONDS))
    session = factories.session_create(factories.experiment_create(), capacity=5)
    stack.start_web()
    worker = stack.start_worker()
    doomed_port, living_port = stack.web_ports
    doomed = _join_over_http(doomed_port, session.code, "PID-DOOMED")
    living = _join_over_http(living_port, session.code, "PID-LIVING")

    async def play() -> None:
        await LiveSeat(port=doomed_port, token=doomed).connect()
        seat = await LiveSeat(port=living_port, token=living).connect()
        assert (await _presence(doomed), await _presence(living)) == ((1, 1), (1, 1))
        await asyncio.to_thread(stack.wait_ready, worker)

        killed_at = time.monotonic()
        stack.webs[0].kill()  # SIGKILL: no disconnect runs
        await _until(doomed, (0, 0), timeout=STALE_SECONDS + 30)
        assert time.monotonic() - killed_at >= STALE_SECONDS - 1  # not before its heartbeat could have come
        # The living process beats: its seat stays connected, past several staleness windows.
        await asyncio.sleep(2 * STALE_SECONDS)
        assert await _presence(living) == (1, 1)
        assert await _lost_events() == [(doomed, {"reason": "server process lost", "process": ANY})]
        await seat.close()
        await _until(living, (0, 0), timeout=10)

    asyncio.run(play())
