"""Every message shape of the participant protocol, declared in one place, and the broadcast helper.

docs/protocol.md documents the same shapes with examples; tests/experiment/test_events.py checks
that what the server sends matches these declarations.

Client → server: one JSON object per frame with a ``type`` from :data:`CLIENT_MESSAGES` and an
optional ``ref`` (any short string) echoed in the reply.

Server → client:
- ``state``: the full state of the participant's seat. Sent on connect and whenever the seat's view
  changes beyond a progress count (stage or phase changes, own submissions).
- ``progress``: how many of the seats that must act in the current phase have acted.
- ``ack`` / ``error``: the reply to one client message.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import functools
import logging
import os
import threading
import zlib
from typing import Any, Literal, NotRequired, TypedDict

from asgiref.sync import SyncToAsync, async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.db import transaction
from redis.exceptions import ConnectionError as RedisConnectionError

from experiment.perprocess import PerProcess

logger = logging.getLogger(__name__)


# ---- client → server ------------------------------------------------------------------------------

class ConsentMsg(TypedDict):
    type: Literal["consent"]
    accept: bool
    ref: NotRequired[str]


class InstructionsDoneMsg(TypedDict):
    type: Literal["instructions.done"]
    ref: NotRequired[str]


class QuizSubmitMsg(TypedDict):
    type: Literal["quiz.submit"]
    answers: dict[str, str]
    ref: NotRequired[str]


class PitchSubmitMsg(TypedDict):
    type: Literal["pitch.submit"]
    round: int
    text: str
    ref: NotRequired[str]


class ChoiceSubmitMsg(TypedDict):
    type: Literal["choice.submit"]
    round: int
    candidate: str
    amount: int
    ref: NotRequired[str]


class ReturnSubmitMsg(TypedDict):
    type: Literal["return.submit"]
    round: int
    selector: str
    amount: int
    ref: NotRequired[str]


class BeliefEntry(TypedDict):
    guess: Literal["human", "bot"]
    confidence: int


class BeliefSubmitMsg(TypedDict):
    type: Literal["belief.submit"]
    round: int
    beliefs: dict[str, BeliefEntry]
    ref: NotRequired[str]


class QuestionnaireSubmitMsg(TypedDict):
    type: Literal["questionnaire.submit"]
    answers: dict[str, Any]
    ref: NotRequired[str]


class PingMsg(TypedDict):
    type: Literal["ping"]
    ref: NotRequired[str]


CLIENT_MESSAGES: dict[str, type] = {
    "consent": ConsentMsg,
    "instructions.done": InstructionsDoneMsg,
    "quiz.submit": QuizSubmitMsg,
    "pitch.submit": PitchSubmitMsg,
    "choice.submit": ChoiceSubmitMsg,
    "return.submit": ReturnSubmitMsg,
    "belief.submit": BeliefSubmitMsg,
    "questionnaire.submit": QuestionnaireSubmitMsg,
    "ping": PingMsg,
}


# ---- server → client ------------------------------------------------------------------------------

class StateEvent(TypedDict):
    type: Literal["state"]
    version: int
    server_time: str
    stage: str
    me: dict[str, Any]
    experiment: dict[str, Any]
    # Exactly one of these is present, matching ``stage``:
    consent: NotRequired[dict[str, Any]]
    instructions: NotRequired[dict[str, Any]]
    quiz: NotRequired[dict[str, Any]]
    lobby: NotRequired[dict[str, Any]]
    game: NotRequired[dict[str, Any]]
    questionnaire: NotRequired[dict[str, Any]]
    end: NotRequired[dict[str, Any]]


class ProgressEvent(TypedDict):
    type: Literal["progress"]
    version: int
    round: int
    phase: str
    done: int
    of: int


class QuizResult(TypedDict):
    correct: bool
    wrong: list[int]  # indexes of the questions answered wrongly


class AckEvent(TypedDict):
    type: Literal["ack"]
    ref: str | None
    action: str
    result: NotRequired[QuizResult]  # only for quiz.submit


class ErrorEvent(TypedDict):
    type: Literal["error"]
    ref: str | None
    code: str
    message: str


SERVER_EVENTS: dict[str, type] = {"state": StateEvent, "progress": ProgressEvent, "ack": AckEvent, "error": ErrorEvent}


def apply_event(state: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """The client's reducer: the state after an event. Mirrored in static/experiment/play.js.

    A ``state`` replaces everything, unless it is older than the state (a lower ``version``); a
    ``progress`` for the current round and phase updates the counter; events older than the state are
    ignored.
    """
    if event["type"] == "state":
        return event if event["version"] >= state["version"] else state
    if event["type"] == "progress":
        game = state.get("game")
        if not game or event["version"] < state["version"]:
            return state
        if (game["round"], game["phase"]) != (event["round"], event["phase"]):
            return state
        return {**state, "version": event["version"],
                "game": {**game, "progress": {"done": event["done"], "of": event["of"]}}}
    return state


# ---- channel-layer fan-out ------------------------------------------------------------------------
# Channel-layer messages name a consumer handler in ``type``: "seat.refresh" asks every connection of
# the receiving channel group to send a fresh ``state``; "seat.forward" forwards ``event`` as is;
# "seat.states" carries ready views, ``states`` by participant id: each connection sends its seat's (with
# ``partial``, a connection whose seat is not among them sends nothing; without, it reads its own).

def group_channel(group_id: int) -> str:
    return f"group-{group_id}"


def seat_channel(participant_id: int) -> str:
    return f"seat-{participant_id}"


def lobby_channel(session_id: int) -> str:
    return f"lobby-{session_id}"


def monitor_channel(session_id: int) -> str:
    return f"monitor-{session_id}"


# Messages that only say "look again": one per transaction and one per sender batch is enough, because
# whoever receives it reads the state as it is then.
REFRESH_TYPES = frozenset({"seat.refresh", "monitor.changed"})


def _refresh_key(channel_group: str, message: dict[str, Any]) -> tuple[str, str] | None:
    return (channel_group, repr(sorted(message.items()))) if message["type"] in REFRESH_TYPES else None


def send_on_commit(channel_group: str, message: dict[str, Any]) -> None:
    """Send to a channel group once the current transaction has committed (never before).

    A refresh is sent once per transaction however often the transaction asks (every Event row asked the
    monitors to look again, 2-5 times per action).
    """
    key = _refresh_key(channel_group, message)
    if key is not None:
        connection = transaction.get_connection()
        if connection.in_atomic_block and any(getattr(entry[1], "partnerlab_key", None) == key
                                              for entry in connection.run_on_commit):
            return
    callback = functools.partial(_send_now, channel_group, message)
    callback.partnerlab_key = key  # type: ignore[attr-defined]
    transaction.on_commit(callback)


def _send_now(channel_group: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        if isinstance(layer, InMemoryChannelLayer):  # its queues belong to the server's own event loop
            async_to_sync(layer.group_send)(channel_group, message)
        elif server_loop() is not None:
            # In the web process: hand over and return. Waiting for Redis here kept a worker thread (and
            # the participant's ack) waiting for 4 round trips per message, 3-4 messages per action.
            _broadcaster.get().put(channel_group, message)
        else:  # Celery task, command: wait, so that a finished task has told everyone
            future = asyncio.run_coroutine_threadsafe(layer.group_send(channel_group, message), _broadcaster.get().loop)
            future.result(timeout=30)
    except Exception:  # a lost notification must never undo a committed action: clients resync on reconnect
        logger.exception("broadcast to %s failed", channel_group)


def server_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop of the ASGI server that called us through sync_to_async, if any."""
    if getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None) != os.getpid():
        return None
    return getattr(SyncToAsync.threadlocal, "main_event_loop", None)


class _Broadcaster:
    """Publishes to the channel layer from one long-lived event loop thread per process.

    Without it, async_to_sync started a thread and an event loop for every broadcast from a plain
    thread (a Celery task), and the Redis channel layer opened a new connection for every loop.
    Messages go out over a few lanes chosen by channel group, so one group's messages keep their order
    while a burst of phase changes in many groups is published in parallel.
    """

    LANES = 4

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._lanes: list[collections.deque[tuple[str, dict[str, Any]]]] = [collections.deque() for _ in range(self.LANES)]
        self._wakes = [asyncio.Event() for _ in range(self.LANES)]
        self._lock = threading.Lock()
        self._outstanding = 0
        self.idle = threading.Event()
        self.idle.set()
        threading.Thread(target=self.loop.run_until_complete, args=(self._drain_all(),), name="partnerlab-broadcast",
                         daemon=True).start()
        atexit.register(self.idle.wait, 5.0)  # let queued notifications out when the process stops

    def put(self, channel_group: str, message: dict[str, Any]) -> None:
        lane = zlib.crc32(channel_group.encode()) % self.LANES
        with self._lock:
            self._lanes[lane].append((channel_group, message))
            self._outstanding += 1
            self.idle.clear()
        self.loop.call_soon_threadsafe(self._wakes[lane].set)

    async def _drain_all(self) -> None:
        await asyncio.gather(*(self._drain(lane) for lane in range(self.LANES)))

    async def _drain(self, lane: int) -> None:
        layer = get_channel_layer()
        while True:
            await self._wakes[lane].wait()
            self._wakes[lane].clear()
            while True:
                with self._lock:
                    batch = list(self._lanes[lane])
                    self._lanes[lane].clear()
                if not batch:
                    break
                kept = _coalesce(batch)
                self._done(len(batch) - len(kept))
                for channel_group, message in kept:
                    try:
                        await layer.group_send(channel_group, message)
                    except (RedisConnectionError, OSError) as exc:
                        # Redis down or restarting: one line, not a traceback per message. The pages catch up
                        # with the next state (every phase change sends one; a reconnection brings the seat's).
                        logger.warning("broadcast to %s failed: Redis unreachable (%s)", channel_group, exc)
                    except Exception:
                        logger.exception("broadcast to %s failed", channel_group)
                    self._done(1)

    def _done(self, n: int) -> None:
        with self._lock:
            self._outstanding -= n
            if self._outstanding == 0:
                self.idle.set()


def _coalesce(batch: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Drop a refresh that repeats an earlier one of the same batch: the first is delivered after every
    commit of the batch."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for channel_group, message in batch:
        key = _refresh_key(channel_group, message)
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        kept.append((channel_group, message))
    return kept


_broadcaster = PerProcess(_Broadcaster)


def refresh_on_commit(channel_group: str) -> None:
    send_on_commit(channel_group, {"type": "seat.refresh"})


def refresh_queued(channel_group: str) -> bool:
    """Whether the current transaction will ask ``channel_group`` to look again when it commits."""
    return _queued_refresh(channel_group) is not None


def refresh_instead(channel_group: str, message: dict[str, Any]) -> None:
    """Send ``message`` instead of the refresh this transaction queued for ``channel_group``, at the refresh's
    place among the transaction's commit callbacks (the group hears of a new phase before the broker does)."""
    index = _queued_refresh(channel_group)
    if index is None:
        raise ValueError(f"no refresh of {channel_group} queued")
    connection = transaction.get_connection()
    savepoints, _, robust = connection.run_on_commit[index]
    connection.run_on_commit[index] = (savepoints, functools.partial(_send_now, channel_group, message), robust)


def _queued_refresh(channel_group: str) -> int | None:
    connection = transaction.get_connection()
    if not connection.in_atomic_block:
        return None
    key = _refresh_key(channel_group, {"type": "seat.refresh"})
    return next((i for i, entry in enumerate(connection.run_on_commit)
                 if getattr(entry[1], "partnerlab_key", None) == key), None)


def view_to_seat_on_commit(participant_id: int, state: dict[str, Any]) -> None:
    """Send one person their ready view once the transaction commits; their connections send it as it is."""
    send_on_commit(seat_channel(participant_id), {"type": "seat.states", "states": {str(participant_id): state}})


def forward_on_commit(channel_group: str, event: dict[str, Any]) -> None:
    send_on_commit(channel_group, {"type": "seat.forward", "event": event})


def monitor_on_commit(session_id: int, group_id: int | None) -> None:
    """Tell the session's live monitors that a group (or, with None, the lobby/session) changed."""
    send_on_commit(monitor_channel(session_id), {"type": "monitor.changed", "group_id": group_id})
