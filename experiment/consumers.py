"""The participant websocket. Thin: authenticate from the URL token, check the frame, call
``actions.dispatch`` in a thread, forward events. No game logic here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from typing import Any

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db.utils import OperationalError

from experiment import actions, busy, events, presence
from experiment.game import RuleError
from experiment.models import Participant
from experiment.perprocess import PerProcess
from experiment.selectors import seat_state


def _off_thread(fn: Any) -> Any:
    """Run a participant's database work in the thread pool, not on the process's one shared sync thread.

    On the shared thread every call of every participant in the process queues behind the one before:
    a call waiting for a row lock or for a broadcast held up everybody (bench/load.py: p50 ack 1.2 s
    with 200 participants while the servers used 0.5 of 2 cores).
    """
    return database_sync_to_async(fn, thread_sensitive=False)


# A seat's view is short work (2-3 ms of CPU) that every person of a group waits for at a phase change; an
# action is longer. Views run on threads of their own, so that they never queue behind a burst of actions
# (the rest of the database work runs on the loop's default executor, PARTNERLAB_WEB_DB_THREADS).
_view_threads = PerProcess(lambda: concurrent.futures.ThreadPoolExecutor(
    settings.PARTNERLAB_WEB_VIEW_THREADS, thread_name_prefix="web-views"))


def _seat_state(participant_id: int) -> Any:
    return database_sync_to_async(seat_state, thread_sensitive=False, executor=_view_threads.get())(participant_id)


@_off_thread
def _participant_by_token(token: str) -> tuple[int, int] | None:
    """A person's seat. After a bot took it over the person may still connect: they see their
    dropout page, and the services refuse their actions (``seat_taken_over``)."""
    row = (Participant.objects.filter(token=token, kind=Participant.Kind.HUMAN)
           .exclude(controller=Participant.Controller.SYNTHETIC).values_list("pk", "session_id")
           .order_by().first())  # (a token is unique: the default ordering would only join two tables)
    return row


class ParticipantConsumer(AsyncWebsocketConsumer):
    participant_id: int
    session_id: int
    connection_id: int | None = None  # this connection's SeatConnection row, while it is counted as open

    async def dispatch(self, message: dict[str, Any]) -> None:
        """As channels' own, without its ``aclose_old_connections()`` before every handler.

        That call hops to the process's one shared sync thread for every frame and every progress or
        refresh message, queued behind every other connection's. The database work here runs in pool
        threads through ``database_sync_to_async``, which closes old connections itself, in that thread.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        try:
            found = await _participant_by_token(self.scope["url_route"]["kwargs"]["token"])
        except OperationalError as exc:
            if not busy.connection_unavailable(exc):
                raise
            await self._busy(exc)
            return
        if found is None:
            await self.close(code=4404)
            return
        self.participant_id, self.session_id = found
        self.joined: set[str] = set()
        self.group_id: int | None = None
        await self.accept()
        try:
            self.connection_id = await presence.here.get().connect(self.participant_id, self)
            await self._send_state()
        except OperationalError as exc:
            if not busy.connection_unavailable(exc):
                raise
            await self._busy(exc, accepted=True)

    async def _busy(self, exc: OperationalError, *, accepted: bool = False) -> None:
        """The database gave no connection: close with the code the page treats as "try again later".

        A close before the accept reaches the browser as a refused handshake (close code 1006, code lost),
        so the connection is accepted first. If this connection was already counted as open, that is
        undone here, once; the disconnect that follows then touches the database no more.
        """
        busy.report("the participant websocket", exc)
        if not accepted:
            await self.accept()
        await self._uncount()
        for name in getattr(self, "joined", set()):
            await self.channel_layer.group_discard(name, self.channel_name)
        if hasattr(self, "joined"):
            del self.joined  # disconnect() then neither unsubscribes nor records the close again
        await self.close(code=busy.BUSY_CLOSE_CODE)

    async def disconnect(self, code: int) -> None:
        for name in getattr(self, "joined", set()):
            await self.channel_layer.group_discard(name, self.channel_name)
        await self._uncount()

    async def _uncount(self) -> None:
        """Stop counting this connection as open, once."""
        connection_id, self.connection_id = self.connection_id, None
        if connection_id is not None:
            await presence.here.get().disconnect(connection_id, self.participant_id)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            await self._error(None, "invalid_message", "Send JSON text frames.")
            return
        if len(text_data) > settings.PARTNERLAB_MAX_FRAME_CHARS:
            await self._error(None, "frame_too_large",
                              f"Messages can be at most {settings.PARTNERLAB_MAX_FRAME_CHARS} characters.")
            return
        try:
            message = json.loads(text_data)
        except (ValueError, RecursionError):  # deeply nested arrays fit in a small frame and exhaust the parser's stack
            await self._error(None, "malformed_json", "That message is not valid JSON.")
            return
        ref = message.get("ref") if isinstance(message, dict) and isinstance(message.get("ref"), str) else None
        try:
            ack = await _off_thread(actions.dispatch)(self.participant_id, message)
        except RuleError as exc:
            await self._error(ref, exc.code, exc.message)
            return
        await self.send(text_data=json.dumps(ack))

    # -- channel-layer handlers ---------------------------------------------------------------

    async def seat_refresh(self, message: dict[str, Any]) -> None:
        await self._send_state()

    async def seat_forward(self, message: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(message["event"]))

    async def seat_states(self, message: dict[str, Any]) -> None:
        state = message["states"].get(str(self.participant_id))
        if state is None:
            if not message.get("partial"):  # a group's views without this seat (cannot happen): read our own
                await self._send_state()
            return  # the lobby's views, sent as this person left it for a group: their game comes on their own channel
        await self._subscribe(state)
        await self.send(text_data=json.dumps(state))

    # -- helpers --------------------------------------------------------------------------------

    async def _send_state(self) -> None:
        state = await _seat_state(self.participant_id)
        await self._subscribe(state)
        await self.send(text_data=json.dumps(state))

    async def _subscribe(self, state: dict[str, Any]) -> None:
        """Follow the seat, and the lobby or the group depending on where the participant is now."""
        wanted = {events.seat_channel(self.participant_id)}
        if state["stage"] == Participant.Status.LOBBY:
            wanted.add(events.lobby_channel(self.session_id))
        if "game" in state:
            if self.group_id is None:  # a seat never changes group: one query, not one per state
                self.group_id = await self._group_id()
            wanted.add(events.group_channel(self.group_id))
        for name in wanted - self.joined:
            await self.channel_layer.group_add(name, self.channel_name)
        for name in self.joined - wanted:
            await self.channel_layer.group_discard(name, self.channel_name)
        self.joined = wanted

    @_off_thread
    def _group_id(self) -> int:
        return Participant.objects.values_list("group_id", flat=True).get(pk=self.participant_id)

    async def _error(self, ref: str | None, code: str, message: str) -> None:
        await self.send(text_data=json.dumps({"type": "error", "ref": ref, "code": code, "message": message}))


class MonitorConsumer(AsyncWebsocketConsumer):
    """The experimenter's live view of one session. Staff only. Sends ``monitor.state`` on connect, then
    ``monitor.group`` / ``monitor.session`` whenever something changes (coalesced over a short window).
    ``monitor.session`` carries the bot profiles' spend and throttling (``bots``), which each model call's
    reply and each throttled wait announce."""

    COALESCE_SECONDS = 0.25

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_staff:
            await self.close(code=4403)
            return
        self.session_id = int(self.scope["url_route"]["kwargs"]["session_id"])
        from experiment.monitor import session_overview

        try:
            overview = await database_sync_to_async(session_overview, thread_sensitive=False)(self.session_id)
        except Exception:  # unknown session
            await self.close(code=4404)
            return
        self.dirty: set[int | None] = set()
        self.flush_task: asyncio.Task[None] | None = None
        await self.channel_layer.group_add(events.monitor_channel(self.session_id), self.channel_name)
        await self.accept()
        await self.send(text_data=json.dumps(overview))

    async def disconnect(self, code: int) -> None:
        if hasattr(self, "session_id"):
            await self.channel_layer.group_discard(events.monitor_channel(self.session_id), self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        # Actions go through the cockpit's HTTP endpoints (CSRF-protected, recorded with the user).
        await self.send(text_data=json.dumps({"type": "error", "ref": None, "code": "read_only",
                                              "message": "The monitor socket only sends updates."}))

    async def monitor_changed(self, message: dict[str, Any]) -> None:
        self.dirty.add(message.get("group_id"))
        if self.flush_task is None or self.flush_task.done():
            self.flush_task = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.COALESCE_SECONDS)
        dirty, self.dirty = self.dirty, set()
        # Off the shared sync thread: a large flush must never delay participants' actions in this process.
        updates = await database_sync_to_async(_monitor_updates, thread_sensitive=False)(self.session_id, dirty)
        for update in updates:
            await self.send(text_data=json.dumps(update))


def _monitor_updates(session_id: int, dirty: set[int | None]) -> list[dict[str, Any]]:
    from experiment.models import Session
    from experiment.monitor import bots_live, group_summary_by_id, lobby_queue, people_by_stage, session_header

    updates: list[dict[str, Any]] = [{"type": "monitor.group", "group": group_summary_by_id(g)} for g in dirty if g]
    session = Session.objects.get(pk=session_id)
    updates.append({"type": "monitor.session", "session": session_header(session), "lobby": lobby_queue(session),
                    "people": people_by_stage(session), "bots": bots_live(session_id)})
    return updates
