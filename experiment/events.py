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
import logging
import os
import threading
from typing import Any, Literal, NotRequired, TypedDict

from asgiref.sync import SyncToAsync, async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.db import transaction

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

    A ``state`` replaces everything; a ``progress`` for the current round and phase updates the
    counter; events older than the state are ignored.
    """
    if event["type"] == "state":
        return event
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
# the receiving channel group to send a fresh ``state``; "seat.forward" forwards ``event`` as is.

def group_channel(group_id: int) -> str:
    return f"group-{group_id}"


def seat_channel(participant_id: int) -> str:
    return f"seat-{participant_id}"


def lobby_channel(session_id: int) -> str:
    return f"lobby-{session_id}"


def monitor_channel(session_id: int) -> str:
    return f"monitor-{session_id}"


def send_on_commit(channel_group: str, message: dict[str, Any]) -> None:
    """Send to a channel group once the current transaction has committed (never before)."""
    transaction.on_commit(lambda: _send_now(channel_group, message))


def _send_now(channel_group: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        if _server_loop() is None and not isinstance(layer, InMemoryChannelLayer):
            future = asyncio.run_coroutine_threadsafe(layer.group_send(channel_group, message), _broadcast_loop())
            future.result(timeout=30)
        else:
            async_to_sync(layer.group_send)(channel_group, message)
    except Exception:  # a lost notification must never undo a committed action: clients resync on reconnect
        logger.exception("broadcast to %s failed", channel_group)


def _server_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop of the ASGI server that called us through sync_to_async, if any."""
    if getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None) != os.getpid():
        return None
    return getattr(SyncToAsync.threadlocal, "main_event_loop", None)


_loop_lock = threading.Lock()
_loop: tuple[int, asyncio.AbstractEventLoop] | None = None


def _broadcast_loop() -> asyncio.AbstractEventLoop:
    """One long-lived event loop per process for broadcasts from plain threads (Celery tasks, commands).

    Without it, async_to_sync starts a thread and an event loop for every broadcast, and the Redis
    channel layer opens a new connection for every loop: about 4 ms of CPU per broadcast in a worker.
    """
    global _loop
    with _loop_lock:
        if _loop is None or _loop[0] != os.getpid():  # a forked worker does not inherit the thread
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="partnerlab-broadcast", daemon=True).start()
            _loop = (os.getpid(), loop)
        return _loop[1]


def refresh_on_commit(channel_group: str) -> None:
    send_on_commit(channel_group, {"type": "seat.refresh"})


def forward_on_commit(channel_group: str, event: dict[str, Any]) -> None:
    send_on_commit(channel_group, {"type": "seat.forward", "event": event})


def monitor_on_commit(session_id: int, group_id: int | None) -> None:
    """Tell the session's live monitors that a group (or, with None, the lobby/session) changed."""
    send_on_commit(monitor_channel(session_id), {"type": "monitor.changed", "group_id": group_id})
