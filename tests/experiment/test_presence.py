"""Presence: a seat counts as connected exactly while it has open websockets on a web process that is alive.

Every open websocket is a SeatConnection row, kept fresh by its web process's heartbeat; the sweep removes the
rows of a process that stopped beating (killed, crashed), whose disconnects never ran. The live version of
this (a real uvicorn process killed with SIGKILL) is in test_presence_live.py.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import connections, transaction
from django.utils import timezone

from experiment import presence, services
from experiment.models import Event, Group, Participant, SeatConnection
from experiment.monitor import group_summary_by_id
from tests import factories
from tests.experiment import gamekit
from tests.wsclient import Seat

executor_connections_closed = gamekit.executor_connections_closed
db = gamekit.db
P = Participant
STALE = timedelta(minutes=5)
PRESENCE_EVENTS = ["participant.connected", "participant.disconnected"]


def _people(group: Group) -> list[Participant]:
    return list(group.participants.filter(controller=P.Controller.PERSON).order_by("seat"))


@pytest.fixture
def group(db: None) -> Group:
    return factories.group_start(factories.session_create(gamekit.experiment_small(), capacity=10))


# ---- the sweep -------------------------------------------------------------------------------------------------

def test_the_sweep_removes_the_connections_of_a_process_that_stopped_beating(
        group: Group, settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.PARTNERLAB_PRESENCE_STALE_SECONDS = 30
    me, other = _people(group)[:2]
    dead = services.connection_open(participant_id=me.pk, process="web-a:11:dead")
    services.connection_open(participant_id=me.pk, process="web-b:12:live")  # a second tab, on another process
    services.connection_open(participant_id=other.pk, process="web-b:12:live")
    assert P.objects.get(pk=me.pk).connections == 2
    # web-a was killed 40 s ago; web-b keeps beating.
    SeatConnection.objects.filter(pk=dead).update(seen_at=timezone.now() - timedelta(seconds=40))
    services.connections_heartbeat(process="web-b:12:live", expected=2)
    notified: list[tuple[int, int | None]] = []
    monkeypatch.setattr(services.events, "monitor_on_commit", lambda s, g: notified.append((s, g)))

    services.sweep()

    assert P.objects.get(pk=me.pk).connections == 1
    assert P.objects.get(pk=other.pk).connections == 1
    assert set(SeatConnection.objects.values_list("process", flat=True)) == {"web-b:12:live"}
    assert not SeatConnection.objects.filter(pk=dead).exists()
    [lost] = Event.objects.filter(type="participant.disconnected")
    assert (lost.participant_id, lost.group_id, lost.session_id) == (me.pk, group.pk, group.session_id)
    assert lost.payload == {"reason": "server process lost", "process": "web-a:11:dead"}
    assert (group.session_id, group.pk) in notified
    seat = next(s for s in group_summary_by_id(group.pk)["seats"] if s["id"] == me.pk)
    assert (seat["connected"], seat["status"]) == (True, "idle")  # the second tab is still open
    # Once the other process is lost too, the seats show offline; a second sweep changes nothing more.
    SeatConnection.objects.update(seen_at=timezone.now() - timedelta(seconds=31))
    assert services.presence_sweep() == 2
    assert services.presence_sweep() == 0
    assert not SeatConnection.objects.exists()
    assert set(P.objects.filter(pk__in=[me.pk, other.pk]).values_list("connections", flat=True)) == {0}
    seats = {s["id"]: s for s in group_summary_by_id(group.pk)["seats"]}
    assert [(seats[p.pk]["connected"], seats[p.pk]["status"]) for p in (me, other)] == [(False, "offline")] * 2
    assert Event.objects.filter(type="participant.disconnected", payload__reason="server process lost").count() == 3


def test_a_live_process_keeps_its_connections_and_a_fresh_one_is_not_stale(group: Group, settings: Any) -> None:
    settings.PARTNERLAB_PRESENCE_STALE_SECONDS = 30
    me = _people(group)[0]
    services.connection_open(participant_id=me.pk, process="web:1:aa")
    SeatConnection.objects.update(seen_at=timezone.now() - timedelta(seconds=29))
    assert services.presence_sweep() == 0
    # Long open, but beating: its age does not matter, only its last heartbeat.
    SeatConnection.objects.update(opened_at=timezone.now() - timedelta(hours=2), seen_at=timezone.now() - STALE)
    assert services.connections_heartbeat(process="web:1:aa", expected=1) is None
    assert services.presence_sweep() == 0
    assert P.objects.get(pk=me.pk).connections == 1
    assert not Event.objects.filter(type="participant.disconnected").exists()


def test_closing_a_connection_the_sweep_removed_counts_nothing_twice(group: Group) -> None:
    me = _people(group)[0]
    gone = services.connection_open(participant_id=me.pk, process="web:1:aa")
    kept = services.connection_open(participant_id=me.pk, process="web:2:bb")
    SeatConnection.objects.filter(pk=gone).update(seen_at=timezone.now() - STALE)
    assert services.presence_sweep() == 1
    # The process was not dead after all (it could not beat): its late disconnect finds no row.
    assert services.connection_close(connection_id=gone, participant_id=me.pk) is False
    assert P.objects.get(pk=me.pk).connections == 1
    assert services.connections_heartbeat(process="web:1:aa", expected=1) == set()  # its row is gone
    assert services.connection_close(connection_id=kept, participant_id=me.pk) is True
    assert P.objects.get(pk=me.pk).connections == 0
    assert Event.objects.filter(type="participant.disconnected").count() == 2


def test_the_sweep_corrects_a_count_that_drifted(group: Group) -> None:
    """A count without rows behind it (from before rows existed) is set to the rows' number when swept."""
    me = _people(group)[0]
    services.connection_open(participant_id=me.pk, process="web:1:aa")
    P.objects.filter(pk=me.pk).update(connections=3)
    SeatConnection.objects.update(seen_at=timezone.now() - STALE)
    services.presence_sweep()
    assert P.objects.get(pk=me.pk).connections == 0


def test_each_process_run_has_its_own_id() -> None:
    process = presence.here.get().process
    assert process == presence.here.get().process
    assert process != presence.Heartbeat().process  # a restart on the same pid is another run


# ---- the consumer and its heartbeat ----------------------------------------------------------------------------

def _rows(participant_id: int) -> tuple[int, list[str]]:
    try:
        return (P.objects.get(pk=participant_id).connections,
                list(SeatConnection.objects.filter(participant_id=participant_id).values_list("process", flat=True)))
    finally:
        connections.close_all()


@db
def _person() -> Participant:
    return _people(factories.group_start(factories.session_create(gamekit.experiment_small(), capacity=10)))[0]


@pytest.mark.django_db(transaction=True)
async def test_each_open_websocket_is_one_row_of_this_process() -> None:
    me = await _person()
    here = presence.here.get().process
    first = await Seat(me.token).connect()
    assert await database_sync_to_async(_rows)(me.pk) == (1, [here])
    second = await Seat(me.token).connect()  # a second tab
    assert await database_sync_to_async(_rows)(me.pk) == (2, [here, here])
    await first.close()
    assert await database_sync_to_async(_rows)(me.pk) == (1, [here])
    await second.close()
    assert await database_sync_to_async(_rows)(me.pk) == (0, [])
    assert presence.here.get().task is None  # no connection left: no heartbeat
    events = await db(lambda: list(Event.objects.filter(participant_id=me.pk, type__in=PRESENCE_EVENTS)
                                   .values_list("type", flat=True)))()
    assert events == ["participant.connected"] * 2 + ["participant.disconnected"] * 2


async def _until(check: Any, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < end, "condition never held"
        await asyncio.sleep(0.05)


@pytest.mark.django_db(transaction=True)
async def test_the_heartbeat_keeps_the_rows_of_open_websockets_fresh(settings: Any) -> None:
    settings.PARTNERLAB_PRESENCE_HEARTBEAT_SECONDS = 0.1
    me = await _person()
    seat = await Seat(me.token).connect()
    old = timezone.now() - STALE
    await db(lambda: SeatConnection.objects.update(seen_at=old))()

    async def fresh() -> bool:
        return await db(lambda: SeatConnection.objects.filter(seen_at__gt=old + STALE).exists())()

    await _until(fresh)
    assert await db(services.presence_sweep)() == 0
    assert (await database_sync_to_async(_rows)(me.pk))[0] == 1
    await seat.close()
    assert presence.here.get().task is None


@pytest.mark.django_db(transaction=True)
async def test_a_websocket_whose_row_was_swept_while_open_is_closed_to_reconnect(settings: Any) -> None:
    """The process could not beat for the whole staleness window (its database was unreachable), so the sweep took
    its rows: the heartbeat closes those websockets, and the pages reconnect and are counted again."""
    settings.PARTNERLAB_PRESENCE_HEARTBEAT_SECONDS = 0.1
    me = await _person()
    seat = await Seat(me.token).connect()

    @db
    def missed_beats() -> int:
        with transaction.atomic():  # (a beat in between waits for the sweep's locks, then finds no row)
            SeatConnection.objects.update(seen_at=timezone.now() - STALE)
            return services.presence_sweep()

    assert await missed_beats() == 1
    assert await database_sync_to_async(_rows)(me.pk) == (0, [])
    message = await seat.comm.receive_output(timeout=10)
    assert message == {"type": "websocket.close", "code": presence.RECOUNT_CLOSE_CODE}
    await seat.close()  # the browser's side of the close: the consumer's disconnect finds its row gone
    back = await Seat(me.token).connect()
    assert await database_sync_to_async(_rows)(me.pk) == (1, [presence.here.get().process])
    await back.close()
    assert await database_sync_to_async(_rows)(me.pk) == (0, [])
