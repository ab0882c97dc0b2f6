"""Which web process serves which participant websocket, kept alive by a heartbeat.

Every open participant websocket is a :class:`~experiment.models.SeatConnection` row naming the process
run that serves it. A process that is killed (``kill -9``, OOM, a crash) never runs its disconnects, so
each web process refreshes ``seen_at`` of its rows every ``PARTNERLAB_PRESENCE_HEARTBEAT_SECONDS``, and
the sweep (``services.presence_sweep``) removes the rows nobody refreshed for
``PARTNERLAB_PRESENCE_STALE_SECONDS``: their seats stop showing as connected in the cockpit.

The heartbeat is an asyncio task on the server's event loop, started by the first connection of the
process and stopped with its last one; its database work runs in a pool thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db.utils import OperationalError

from experiment import busy, services
from experiment.perprocess import PerProcess

logger = logging.getLogger(__name__)

# Close code for a connection whose row the sweep removed while this process lived (its heartbeat could not
# reach the database for the whole staleness window): the page reconnects and is counted afresh.
RECOUNT_CLOSE_CODE = 1012  # "service restart"


def _off_thread(fn: Any) -> Any:
    return database_sync_to_async(fn, thread_sensitive=False)


class Heartbeat:
    """This process's open connections (row id → consumer) and the task that keeps their rows fresh."""

    def __init__(self) -> None:
        # Unique to this run of this process: a pid alone comes back after a restart, or on another host.
        self.process = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.open: dict[int, Any] = {}
        # Rows whose close could not reach the database (row id → participant id): closed by the next beats,
        # since until then this process's beats would keep them alive.
        self.closing: dict[int, int] = {}
        self.task: asyncio.Task[None] | None = None

    async def connect(self, participant_id: int, consumer: Any) -> int:
        """Count one open websocket of the seat (its row names this process); returns the row's id.
        Raises OperationalError when the database gives no connection: nothing is counted then."""
        connection_id = await _off_thread(services.connection_open)(participant_id=participant_id, process=self.process)
        self.open[connection_id] = consumer
        self._ensure_running()
        return connection_id

    async def disconnect(self, connection_id: int, participant_id: int) -> None:
        """The websocket closed: delete its row. Without a database connection the next beats delete it, as soon
        as they can (until then the seat may show as connected while it is not)."""
        self.open.pop(connection_id, None)  # first, so that no beat takes it for a lost one
        try:
            await _off_thread(services.connection_close)(connection_id=connection_id, participant_id=participant_id)
        except Exception as exc:
            if isinstance(exc, OperationalError) and busy.connection_unavailable(exc):
                busy.report("the participant websocket", exc)
            else:
                logger.exception("closing connection %s failed; the heartbeat tries again", connection_id)
            self.closing[connection_id] = participant_id
            self._ensure_running()
            return
        if not self.open and not self.closing and self.task is not None:
            if self.task.get_loop() is asyncio.get_running_loop():
                self.task.cancel()  # nothing left to keep fresh: no task, no query, until the next connection
            self.task = None

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:
            self.task = loop.create_task(self._run(), name="partnerlab-presence-heartbeat")

    async def _run(self) -> None:
        every = settings.PARTNERLAB_PRESENCE_HEARTBEAT_SECONDS
        while self.open or self.closing:
            await asyncio.sleep(every)
            try:
                await self.beat()
            except Exception:  # the next beat tries again; the process must never go down for this
                logger.exception("presence heartbeat of %s failed", self.process)
        if self.task is asyncio.current_task():
            self.task = None

    async def beat(self) -> None:
        """One heartbeat: close what could not be closed before, then refresh every row of this process."""
        for connection_id, participant_id in list(self.closing.items()):
            try:
                await _off_thread(services.connection_close)(connection_id=connection_id, participant_id=participant_id)
            except OperationalError as exc:
                if not busy.connection_unavailable(exc):
                    raise
                return  # still no database: nothing else would succeed either
            self.closing.pop(connection_id, None)
        if not self.open:
            return
        known = dict(self.open)
        present = await _off_thread(services.connections_heartbeat)(process=self.process, expected=len(known))
        if present is None:
            return
        # The sweep took rows of connections that are still open here (this process could not beat for the whole
        # staleness window): close them, so that their pages reconnect and are counted again.
        lost = [cid for cid in known if cid not in present and cid in self.open]
        if lost:
            logger.warning("%d connections of %s were swept while open; closing them so they reconnect",
                           len(lost), self.process)
        for cid in lost:
            consumer = self.open.pop(cid)
            with contextlib.suppress(Exception):
                await consumer.close(code=RECOUNT_CLOSE_CODE)


here = PerProcess(Heartbeat)  # a forked uvicorn worker gets its own id and its own task
