"""Synthetic participants over real connections: transport, orchestration and measurement only.

A :class:`SimClient` does what a browser does: it opens the join link over HTTP
(``GET /join/<code>/?PROLIFIC_PID=…``), follows the redirect to ``/play/<token>/``, opens the
websocket ``/ws/play/<token>/`` and speaks the participant protocol (``experiment/events.py``,
``docs/protocol.md``) from consent to the end page.

It also does what the pages do when the server is short of database connections (``experiment/busy.py``):
an HTTP ``503`` with ``Retry-After`` (the "study is busy" page) is asked again, same URL and so the same
``PROLIFIC_PID``, after that many seconds (at most ``busy_max_wait`` per wait, ``busy_tries`` answers per
page); a websocket that closes before the end (``4503``, "busy", or any other drop) is opened again with
the game page's backoff (half to all of min(15 s, 0.5 s × 2^n), n counting the retries since the last
connection that brought a state; at most ``ws_tries`` in a row). Every HTTP answer and every websocket
connection is recorded in the client's report (:class:`HttpAttempt`, :class:`WsAttempt`). A busy answer
is not an error; any other 5xx is (``http_5xx``), and so is every drop of the websocket other than a
busy close (``closed``), even when the reconnection succeeds. A client that runs out of tries records
``gave_up``. *What* it sends, and after how long, is decided by
:class:`bots.synthetic.SyntheticHuman` (the one copy of synthetic behaviour); this module never
makes a decision of its own.

Measured on the client: for every message, the time from sending it to its ``ack``/``error``; for
every phase, when the state announcing it arrived, next to the server's ``phase_started``. A
phase that opens before the previous phase's deadline was opened by that phase's last decision, so
``received − phase_started`` is the time from the last decision to this client seeing the next
phase (same clock when server and clients share the machine).

Used by ``manage.py simulate``, ``manage.py power`` and ``bench/load.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import http.client
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import h11
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Origin

from bots.synthetic import SyntheticHuman, SyntheticParams
from experiment.events import apply_event
from experiment.game import rng as seeded_rng

logger = logging.getLogger(__name__)

END_STAGES = frozenset({"finished", "declined", "lobby_timeout", "dropped"})
GAME_ACTIONS = frozenset({"pitch.submit", "choice.submit", "return.submit", "belief.submit"})
# Stages outside the game have no deadline; a person's pace there is still bounded (see SyntheticHuman.TIMES).
STAGE_SECONDS = 120.0
SERVER_ENV = "PARTNERLAB_SIMULATION_SERVER"
HTTP_TIMEOUT = 30.0
# Busy answers (experiment/busy.py, docs/protocol.md): what the browser's busy page and game page do.
BUSY_CLOSE_CODE = 4503  # websocket close code: the server had no database connection, try again later
PHASE_ORDER = ("pitch", "choice", "return", "feedback", "belief")  # within a round (experiment.game.phases_of_round)
PERMANENT_CLOSE_CODES = frozenset({4403, 4404})  # the page gives up: the seat is not (or no longer) this browser's
BUSY_TRIES = 12  # HTTP answers per page (the first included) before a client gives up, while they are busy 503s
BUSY_MAX_WAIT = 30.0  # longest wait for one Retry-After, seconds
WS_TRIES = 10  # websocket connections in a row that bring no state before a client gives up
RETRY_FIRST = 0.5  # the game page's reconnection backoff (static/experiment/play.js), seconds
RETRY_MAX = 15.0
REDIRECTS = frozenset({301, 302, 303, 307})


class SimulationError(RuntimeError):
    """The simulation could not run (bad option, server not reachable); the message says why."""

    def __init__(self, message: str, *, code: str = "simulation") -> None:
        super().__init__(message)
        self.code = code


# ---- what one client records ------------------------------------------------------------------------

@dataclass
class ActionRecord:
    action: str
    sent_at: float  # epoch seconds
    latency: float | None  # seconds from send to ack/error; None when no reply came
    error: str = ""  # error code ("" for an ack)
    round: int | None = None
    phase: str = ""


@dataclass
class PhaseRecord:
    round: int
    phase: str
    started: float  # server's phase_started, epoch seconds
    received: float  # when this client got the first state of the phase, epoch seconds
    previous_deadline: float | None  # deadline of the phase this client saw before (None: first phase)
    built: float | None = None  # the state's server_time: when the server built this client's view

    @property
    def after_decision(self) -> bool:
        """True when the previous phase closed early, i.e. its last decision opened this phase."""
        return self.previous_deadline is not None and self.started < self.previous_deadline - 0.05


@dataclass
class HttpAttempt:
    """One HTTP request of a client (the join link or the game page) and its answer."""

    page: str  # "join" or "play"
    at: float  # epoch seconds when it was sent
    status: int = 0  # 0: no answer (connection refused, reset, timed out: see ``error``)
    seconds: float | None = None  # until the answer
    retry_after: float | None = None  # a 503's Retry-After, seconds (None: absent, unreadable or not a 503)
    waited: float = 0.0  # how long the client then waited before asking again
    error: str = ""

    @property
    def busy(self) -> bool:
        """The server's "study is busy, try again" answer: 503 with Retry-After."""
        return self.status == 503 and self.retry_after is not None


@dataclass
class WsAttempt:
    """One websocket connection of a client, from opening it to its close."""

    at: float  # epoch seconds when it was opened
    opened: bool = False  # the handshake succeeded
    closed_at: float | None = None  # epoch seconds when it ended (closed by either side, or failed to open)
    got_state: bool = False  # it brought at least one state (the page counts only that as being back)
    close_code: int | None = None  # the server's close code (1006: dropped without one); None: we closed it, or never opened
    status: int | None = None  # the handshake's HTTP status when the server refused it
    retry_after: float | None = None  # a refused handshake's 503 Retry-After
    waited: float = 0.0  # how long the client then waited before the next connection
    error: str = ""

    @property
    def busy(self) -> bool:
        return self.close_code == BUSY_CLOSE_CODE or (self.status == 503 and self.retry_after is not None)


@dataclass
class ClientReport:
    index: int
    token: str = ""
    seat: str = ""
    role: str = ""
    stage: str = ""  # the last stage seen; one of END_STAGES when the client got to the end
    joined_at: float | None = None
    playing_at: float | None = None
    ended_at: float | None = None
    actions: list[ActionRecord] = field(default_factory=list)
    phases: list[PhaseRecord] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)  # {"code", "message"}
    http: list[HttpAttempt] = field(default_factory=list)  # every HTTP answer, retries included
    ws: list[WsAttempt] = field(default_factory=list)  # every websocket connection, reconnections included
    gave_up: str = ""  # why the client stopped trying ("" unless it ran out of tries)
    left_at: float | None = None  # epoch seconds when it walked away for good (``leave_at``), never to come back
    left_phase: tuple[int, str] | None = None  # the (round, phase) it walked away in

    @property
    def completed(self) -> bool:
        return self.stage in END_STAGES

    @property
    def busy_answers(self) -> int:
        """Busy answers this client got and retried: HTTP 503s with Retry-After and websocket busy closes."""
        return sum(h.busy for h in self.http) + sum(w.busy for w in self.ws)

    def error(self, code: str, message: str) -> None:
        self.errors.append({"code": code, "message": message})


# ---- HTTP, as a browser's first two requests ---------------------------------------------------------

async def http_get(url: str, *, cookie: str = "") -> tuple[int, list[tuple[str, str]], bytes]:
    """One HTTP/1.1 GET (no redirect following): status, headers (lower-case names), body."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SimulationError(f"Not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    context = ssl.create_default_context() if parts.scheme == "https" else None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = [("Host", parts.netloc), ("User-Agent", "PartnerLab-simulation"), ("Accept", "text/html"),
               ("Connection", "close")]
    if cookie:
        headers.append(("Cookie", cookie))
    conn = h11.Connection(h11.CLIENT)
    async with asyncio.timeout(HTTP_TIMEOUT):
        reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=context)
        try:
            writer.write(conn.send(h11.Request(method="GET", target=target, headers=headers)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            status, got, body = 0, [], bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    got = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, got, bytes(body)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delay-seconds or an HTTP date); None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def reconnect_delay(retry: int, random: float) -> float:
    """Seconds before reconnection number ``retry`` (from 0) of a row, as the game page waits; ``random`` in [0, 1)."""
    ceiling = min(RETRY_MAX, RETRY_FIRST * 2 ** min(retry, 30))
    return ceiling / 2 + random * ceiling / 2


def _error_code(status: int) -> str:
    return "http_5xx" if status >= 500 else "join"


def _cookie_of(headers: list[tuple[str, str]]) -> str:
    return "; ".join(v.split(";", 1)[0] for k, v in headers if k == "set-cookie")


def _epoch(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


# ---- one synthetic participant -------------------------------------------------------------------

class ArrivalGate:
    """Lets the lobby fill one group at a time, in a fixed order, so that which client ends up in which
    group and seat (and so every decision) does not depend on who happened to be faster.

    Clients are in batches of one group's humans; a batch may enter the lobby once the previous batch
    is all in (or gone). Without a gate clients arrive as they come, as real people do.
    """

    def __init__(self, *, clients: int, batch: int) -> None:
        self.batch = batch
        self._open = [asyncio.Event() for _ in range((clients + batch - 1) // batch + 1)]
        self._arrived = [0] * len(self._open)
        self._counted: set[int] = set()
        self._open[0].set()

    async def wait(self, index: int) -> None:
        await self._open[index // self.batch].wait()

    def arrived(self, index: int) -> None:
        """``index`` is in the lobby, in a group, or will never get there. Idempotent."""
        if index in self._counted:
            return
        self._counted.add(index)
        b = index // self.batch
        self._arrived[b] += 1
        if self._arrived[b] >= self.batch:
            self._open[b + 1].set()


class SimClient:
    """One synthetic participant: a browser's transport around a :class:`SyntheticHuman`."""

    def __init__(self, *, index: int, base_url: str, code: str, human: SyntheticHuman, seed: int,
                 rng_group: Hashable, gate: ArrivalGate | None = None, lobby_actions: frozenset[str] = frozenset(),
                 ack_timeout: float = 30.0, busy_tries: int = BUSY_TRIES, busy_max_wait: float = BUSY_MAX_WAIT,
                 ws_tries: int = WS_TRIES, leave_at: tuple[int, str] | None = None) -> None:
        self.index, self.base_url, self.code, self.human, self.seed = index, base_url.rstrip("/"), code, human, seed
        self.rng_group, self.gate, self.lobby_actions, self.ack_timeout = rng_group, gate, lobby_actions, ack_timeout
        self.busy_tries, self.busy_max_wait, self.ws_tries = max(1, busy_tries), max(0.0, busy_max_wait), max(1, ws_tries)
        self.report = ClientReport(index=index)
        self.leave_at = leave_at
        self.state: dict[str, Any] = {}
        self._changed = asyncio.Event()
        self._closed = False
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._refs = 0
        self._last_deadline: float | None = None
        self._seen_phases: set[tuple[int, str]] = set()
        self._states = 0  # states received, over all connections

    # -- entry point ------------------------------------------------------------------------------

    async def run(self) -> ClientReport:
        try:
            cookie = await self._join()
            await self._play(cookie)
        except asyncio.CancelledError:
            self.report.error("time_limit", f"still at {self.report.stage or 'joining'} when the run's time limit was reached")
            raise
        except SimulationError as exc:
            self.report.error(exc.code, str(exc))
        except (OSError, TimeoutError, ConnectionClosed, h11.ProtocolError) as exc:
            self.report.error("transport", f"{type(exc).__name__}: {exc}")
        finally:
            if self.gate is not None:
                self.gate.arrived(self.index)
        return self.report

    # -- HTTP --------------------------------------------------------------------------------------

    async def _join(self) -> str:
        """The join link and the game page; returns the seat's cookie."""
        query = urllib.parse.urlencode({"PROLIFIC_PID": f"SIM{self.seed % 10**8}x{self.index}",
                                        "STUDY_ID": "simulation", "SESSION_ID": f"sim{self.index}"})
        status, headers, body = await self._get("join", f"{self.base_url}/join/{self.code}/?{query}")
        location = dict(headers).get("location", "")
        if status not in REDIRECTS or "/play/" not in location:
            raise SimulationError(f"join: HTTP {status} instead of a redirect to the game page: {body[:200]!r}",
                                  code=_error_code(status))
        cookie = _cookie_of(headers)
        play_url = urllib.parse.urljoin(f"{self.base_url}/", location)
        status, _, body = await self._get("play", play_url, cookie=cookie)
        if status != 200:
            raise SimulationError(f"game page: HTTP {status}: {body[:200]!r}", code=_error_code(status))
        self.report.token = urllib.parse.urlsplit(play_url).path.rstrip("/").rsplit("/", 1)[-1]
        self.report.joined_at = time.time()
        return cookie

    async def _get(self, page: str, url: str, *, cookie: str = "") -> tuple[int, list[tuple[str, str]], bytes]:
        """GET ``url`` as the browser does, busy page included: a 503 with Retry-After is asked again, the
        same URL, after that long (at most ``busy_max_wait``), up to ``busy_tries`` answers in all."""
        for tries in range(1, self.busy_tries + 1):
            record = HttpAttempt(page=page, at=time.time())
            self.report.http.append(record)
            started = time.perf_counter()
            try:
                status, headers, body = await http_get(url, cookie=cookie)
            except BaseException as exc:
                record.error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                record.seconds = time.perf_counter() - started
            record.status = status
            if status == 503:
                record.retry_after = parse_retry_after(dict(headers).get("retry-after"))
            if not record.busy:
                return status, headers, body
            if tries < self.busy_tries:
                record.waited = min(record.retry_after or 0.0, self.busy_max_wait)
                await asyncio.sleep(record.waited)
        self.report.gave_up = f"{page}: still busy after {self.busy_tries} answers"
        raise SimulationError(f"{page}: HTTP 503 (busy) {self.busy_tries} times in a row; gave up", code="gave_up")

    # -- websocket ---------------------------------------------------------------------------------

    async def _play(self, cookie: str) -> None:
        """Websocket connections until the end page: a connection that closes before it is opened again
        with the game page's backoff (a busy answer's Retry-After, when it gave one)."""
        parts = urllib.parse.urlsplit(self.base_url)
        ws_url = urllib.parse.urlunsplit(("wss" if parts.scheme == "https" else "ws", parts.netloc,
                                          f"{parts.path}/ws/play/{self.report.token}/", "", ""))
        jitter = seeded_rng(self.seed, "reconnect", self.index)  # timing only: decisions have their own streams
        retries = 0  # reconnections since the last connection that brought a state
        while True:
            attempt = WsAttempt(at=time.time())
            self.report.ws.append(attempt)
            wait: float | None = None  # None: the backoff
            states = self._states
            try:
                async with connect(ws_url, origin=Origin(f"{parts.scheme}://{parts.netloc}"),
                                   additional_headers={"Cookie": cookie} if cookie else None,
                                   user_agent_header="PartnerLab-simulation", open_timeout=30, proxy=None) as ws:
                    attempt.opened = True
                    await self._connection(ws)
                    attempt.close_code = ws.close_code  # None when we are the ones closing (the end)
            except InvalidStatus as exc:
                status = attempt.status = exc.response.status_code
                attempt.error = f"handshake: HTTP {status}"
                if status == 503:
                    attempt.retry_after = parse_retry_after(exc.response.headers.get("Retry-After"))
                if attempt.busy:
                    wait = min(attempt.retry_after or 0.0, self.busy_max_wait)
                elif status in (403, 404):  # how an ASGI server passes on a close before the accept (4404)
                    raise SimulationError(f"the server refused the websocket: HTTP {status}", code="closed") from None
                else:
                    self.report.error("http_5xx" if status >= 500 else "ws_open",
                                      f"websocket handshake: HTTP {status}; reconnecting")
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                attempt.error = f"{type(exc).__name__}: {exc}"
                self.report.error("ws_open", f"websocket: {attempt.error}; reconnecting")
            finally:
                attempt.closed_at = time.time()
            attempt.got_state = self._states > states
            if self.report.stage in END_STAGES or self.report.left_at is not None:
                return
            code = attempt.close_code
            if code in PERMANENT_CLOSE_CODES:
                raise SimulationError(f"the server closed the websocket with {code} (last stage: "
                                      f"{self.report.stage or 'none'})", code="closed")
            if attempt.opened and code != BUSY_CLOSE_CODE:
                self.report.error("closed", f"the server closed the websocket ({code}) at stage "
                                            f"{self.report.stage or 'none'}; reconnecting")
            if attempt.got_state:
                retries = 0
            if retries >= self.ws_tries:
                self.report.gave_up = f"websocket: no state in {self.ws_tries} connections in a row"
                raise SimulationError(f"the websocket brought no state in {self.ws_tries} connections in a row "
                                      f"(last: {attempt.error or code}); gave up", code="gave_up")
            attempt.waited = wait if wait is not None else reconnect_delay(retries, jitter.random())
            retries += 1
            await asyncio.sleep(attempt.waited)

    async def _connection(self, ws: ClientConnection) -> None:
        """One connection: read and act until the end page or until it closes."""
        self._closed = False
        self._changed.clear()
        self._replies = {}
        reader = asyncio.create_task(self._read(ws))
        try:
            await self._act(ws)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                received = time.time()
                event = json.loads(raw)
                kind = event.get("type")
                if kind in ("state", "progress"):
                    self.state = apply_event(self.state, event) if self.state else event
                    if kind == "state":
                        self._states += 1
                        self._saw_state(event, received)
                    self._changed.set()
                elif kind in ("ack", "error"):
                    future = self._replies.pop(event.get("ref") or "", None)
                    if future is not None and not future.done():
                        future.set_result(event)
                    elif kind == "error":
                        self.report.error(event.get("code") or "error", f"unsolicited: {event.get('message')}")
        except ConnectionClosed:
            pass
        finally:
            self._closed = True
            self._changed.set()
            for future in self._replies.values():
                if not future.done():
                    future.set_exception(ConnectionError("the websocket closed before the reply"))

    def _saw_state(self, state: dict[str, Any], received: float) -> None:
        me = state.get("me") or {}
        self.report.seat, self.report.role = me.get("seat") or self.report.seat, me.get("role") or self.report.role
        self.report.stage = state["stage"]
        game = state.get("game")
        if game is None:
            return
        if self.report.playing_at is None:
            self.report.playing_at = received
        key = (game["round"], game["phase"])
        if key in self._seen_phases or not game.get("phase_started"):
            return
        self._seen_phases.add(key)
        self.report.phases.append(PhaseRecord(round=key[0], phase=key[1], started=_epoch(game["phase_started"]) or 0.0,
                                              received=received, previous_deadline=self._last_deadline,
                                              built=_epoch(state.get("server_time"))))
        self._last_deadline = _epoch(game.get("deadline"))

    def _task(self, state: dict[str, Any]) -> tuple[Any, ...] | None:
        """What is asked of this participant now (a stable key), or None when there is nothing to do."""
        stage = state["stage"]
        if stage == "playing":
            game = state["game"]
            return ("game", game["round"], game["phase"]) if game.get("todo") else None
        if stage == "quiz":
            return ("quiz", state["quiz"]["attempts"])
        if stage in ("consent", "instructions", "questionnaire"):
            return (stage,)
        return None

    def _rng_for(self, task: tuple[Any, ...], purpose: str):
        # Keyed by what the seat is (group, seat) once it has one, so decisions never depend on timing.
        who = (self.rng_group, self.report.seat) if self.report.seat else ("client", self.index)
        return seeded_rng(self.seed, "synthetic", *who, *task, purpose)

    async def _act(self, ws: ClientConnection) -> None:
        done: tuple[Any, ...] | None = None
        while True:
            await self._changed.wait()
            self._changed.clear()
            if self._closed:
                return  # the end page, or a lost connection: _play decides
            stage = self.state.get("stage", "")
            if self.gate is not None and stage in ("lobby", "playing", *END_STAGES):
                self.gate.arrived(self.index)
            if stage in END_STAGES:
                self.report.ended_at = time.time()
                return
            if self._leaves_now():
                return  # closes this connection; _play does not open another
            task = self._task(self.state)
            if task is None or task == done:
                continue
            done = task
            await self._wait_like_a_person(task)
            if self._task(self.state) != task:
                continue  # the phase moved on meanwhile (its deadline passed): the server applied the default
            for message in self.human.decide(self.state, self._rng_for(task, "decide")):
                if self.gate is not None and message["type"] in self.lobby_actions:
                    await self.gate.wait(self.index)
                await self._send(ws, message, task)

    def _leaves_now(self) -> bool:
        """Walk away for good (a tab closed mid-study) once the game reaches ``leave_at``: (round, phase)."""
        game = self.state.get("game") if self.state.get("stage") == "playing" else None
        if self.leave_at is None or not game:
            return False
        order = list(PHASE_ORDER)
        here = (game["round"], order.index(game["phase"]) if game["phase"] in order else len(order))
        if here < (self.leave_at[0], order.index(self.leave_at[1])):
            return False
        self.report.left_at, self.report.left_phase = time.time(), (game["round"], game["phase"])
        return True

    async def _wait_like_a_person(self, task: tuple[Any, ...]) -> None:
        if task[0] == "game":
            game = self.state["game"]
            started, deadline = _epoch(game.get("phase_started")), _epoch(game.get("deadline"))
            duration = (deadline - started) if started and deadline else STAGE_SECONDS
            delay = self.human.delay(task[2], duration, self._rng_for(task, "delay"))
            # The delay counts from the phase's opening (as for automated seats), not from when we heard of it.
            wait = min(delay, max(0.0, (started or time.time()) + delay - time.time()))
        else:
            wait = self.human.delay(task[0], STAGE_SECONDS, self._rng_for(task, "delay"))
        await asyncio.sleep(wait)

    async def _send(self, ws: ClientConnection, message: dict[str, Any], task: tuple[Any, ...]) -> None:
        self._refs += 1
        ref = f"c{self.index}-{self._refs}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[ref] = future
        record = ActionRecord(action=message["type"], sent_at=time.time(), latency=None,
                              round=task[1] if task[0] == "game" else None, phase=task[2] if task[0] == "game" else "")
        self.report.actions.append(record)
        started = time.perf_counter()
        try:
            await ws.send(json.dumps({**message, "ref": ref}))
            reply = await asyncio.wait_for(future, self.ack_timeout)
        except (ConnectionClosed, ConnectionError):
            # The connection went away first: the page would leave it to the state of the next connection
            # (which says whether the server got it). The drop itself is counted once, by _play.
            self._replies.pop(ref, None)
            record.error = "disconnected"
            return
        except TimeoutError:
            self._replies.pop(ref, None)
            record.error = "no_reply"
            self.report.error("no_reply", f"{message['type']}: no reply within {self.ack_timeout:.0f} s")
            return
        record.latency = time.perf_counter() - started
        if reply["type"] == "error":
            record.error = reply.get("code") or "error"
            self.report.error(record.error, f"{message['type']}: {reply.get('message')}")


# ---- many clients ---------------------------------------------------------------------------------

async def run_clients(*, base_url: str, code: str, count: int, human: SyntheticHuman, seed: int, group_size: int,
                      ordered: bool, lobby_actions: frozenset[str] = frozenset({"quiz.submit"}),
                      ramp_seconds: float = 0.0, time_limit: float, ack_timeout: float = 30.0,
                      busy_tries: int = BUSY_TRIES, busy_max_wait: float = BUSY_MAX_WAIT,
                      ws_tries: int = WS_TRIES, leave_at: Mapping[int, tuple[int, str]] | None = None) -> list[ClientReport]:
    """Run ``count`` clients concurrently until all reach the end or ``time_limit`` seconds pass.

    ``ordered``: groups fill in client order (reproducible runs; see :class:`ArrivalGate`).
    ``lobby_actions``: the message types whose acceptance puts a participant in the lobby.
    ``ramp_seconds``: arrivals are spread over this long (as people arrive), client ``i`` at ``i/count`` of it.
    ``busy_tries``, ``busy_max_wait``, ``ws_tries``: how long a client keeps trying (see :class:`SimClient`).
    ``leave_at``: client index → (round, phase) at which that client closes its tab and never comes back.
    """
    gate = ArrivalGate(clients=count, batch=group_size) if ordered else None
    clients = [SimClient(index=i, base_url=base_url, code=code, human=human, seed=seed,
                         rng_group=i // group_size if ordered else i, gate=gate, lobby_actions=lobby_actions,
                         ack_timeout=ack_timeout, busy_tries=busy_tries, busy_max_wait=busy_max_wait,
                         ws_tries=ws_tries, leave_at=(leave_at or {}).get(i)) for i in range(count)]

    async def arrive(client: SimClient) -> ClientReport:
        await asyncio.sleep(ramp_seconds * client.index / max(1, count))
        return await client.run()

    tasks = [asyncio.create_task(arrive(c)) for c in clients]
    _, pending = await asyncio.wait(tasks, timeout=time_limit)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return [c.report for c in clients]


# ---- summaries --------------------------------------------------------------------------------------

def percentiles(values: Sequence[float], points: Sequence[int] = (50, 95, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles in milliseconds (None when there are no values)."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for p in points:
        if not ordered:
            out[f"p{p}"] = None
            continue
        rank = max(1, -(-p * len(ordered) // 100))
        out[f"p{p}"] = round(ordered[rank - 1] * 1000, 1)
    out["max"] = round(ordered[-1] * 1000, 1) if ordered else None
    out["n"] = len(ordered)
    return out


def phase_change_latencies(reports: Sequence[ClientReport], group_of: Mapping[str, Hashable]) -> dict[str, list[float]]:
    """Per phase of each group: time from the server opening it to the *last* client of the group receiving it.

    Split by cause: ``after_decision`` (the previous phase's last decision opened it) and
    ``after_deadline`` (the previous phase ran its time, e.g. feedback, or a timeout). For the first,
    ``to_view`` and ``view_to_client`` split the slowest client's time at its state's ``server_time``.
    """
    seen: dict[tuple[Hashable, int, str], list[PhaseRecord]] = defaultdict(list)
    for report in reports:
        group = group_of.get(report.token)
        if group is None:
            continue
        for record in report.phases:
            seen[(group, record.round, record.phase)].append(record)
    out: dict[str, list[float]] = {"after_decision": [], "after_deadline": [], "to_view": [], "view_to_client": []}
    for records in seen.values():
        if all(r.previous_deadline is None for r in records):
            continue  # the game's first phase: opened by the lobby, not by a phase
        last = max(records, key=lambda r: r.received)
        latency = last.received - records[0].started
        after_decision = any(r.after_decision for r in records)
        out["after_decision" if after_decision else "after_deadline"].append(max(0.0, latency))
        if after_decision and last.built is not None:  # where the slowest client's time went
            out["to_view"].append(max(0.0, last.built - records[0].started))
            out["view_to_client"].append(max(0.0, last.received - last.built))
    return out


def summarize(reports: Sequence[ClientReport], *, group_of: Mapping[str, Hashable], duration: float) -> dict[str, Any]:
    """The client-side figures of a run: completion, decisions, errors and latencies."""
    acked = [a for r in reports for a in r.actions if a.latency is not None and not a.error]
    errors = [{"client": r.index, **e} for r in reports for e in r.errors]
    codes = Counter(e["code"] for e in errors)
    phases = phase_change_latencies(reports, group_of)
    return {
        "clients": len(reports),
        "clients_completed": sum(r.completed for r in reports),
        "clients_by_stage": dict(Counter(r.stage or "not joined" for r in reports)),
        "decisions": sum(a.action in GAME_ACTIONS for a in acked),
        "actions": len(acked),
        "errors": len(errors),
        "errors_by_kind": dict(codes.most_common(20)),
        "error_examples": errors[:10],
        "duration_s": round(duration, 1),
        "ack_ms": percentiles([a.latency for r in reports for a in r.actions if a.latency is not None]),
        "ack_ms_by_action": {kind: percentiles([a.latency for r in reports for a in r.actions
                                                if a.action == kind and a.latency is not None])
                             for kind in sorted({a.action for r in reports for a in r.actions})},
        "phase_change_ms": percentiles(phases["after_decision"]),
        "phase_change_after_deadline_ms": percentiles(phases["after_deadline"]),
        # The slowest client's share of "phase_change_ms": until its view was built, and from then to it.
        "phase_change_to_view_ms": percentiles(phases["to_view"]),
        "phase_change_view_to_client_ms": percentiles(phases["view_to_client"]),
        **connection_summary(reports, group_of=group_of),
    }


def _status_key(status: int) -> str:
    return str(status) if status else "no answer"


def connection_summary(reports: Sequence[ClientReport], *, group_of: Mapping[str, Hashable | None]) -> dict[str, Any]:
    """Every HTTP answer by status, busy answers and what became of the clients that got them, reconnections.

    ``group_of`` maps a seat's token to its group (None: not placed in one).
    """
    by_page: dict[str, Counter[str]] = {"join": Counter(), "play": Counter()}
    for r in reports:
        for h in r.http:
            by_page.setdefault(h.page, Counter())[_status_key(h.status)] += 1
    total: Counter[str] = Counter()
    for counts in by_page.values():
        total.update(counts)
    busy = [r for r in reports if r.busy_answers]
    placed = [r for r in busy if group_of.get(r.token) is not None]
    closes = Counter(str(w.close_code) for r in reports for w in r.ws if w.opened and w.close_code is not None)
    return {
        "http_status": dict(sorted(total.items())),
        "http_status_by_page": {page: dict(sorted(c.items())) for page, c in by_page.items()},
        # Answers that count as errors: every 5xx except the busy page (503 with Retry-After).
        "http_5xx": sum(h.status >= 500 and not h.busy for r in reports for h in r.http),
        "busy": {
            "http_503": sum(h.busy for r in reports for h in r.http),
            "websocket": sum(w.busy for r in reports for w in r.ws),
            "clients": len(busy),
            "clients_placed": len(placed),  # got busy answers, retried, and got a seat in a group
            "clients_lost": len(busy) - len(placed),
            "longest_wait_s": round(max((sum(h.waited for h in r.http if h.busy) + sum(w.waited for w in r.ws if w.busy)
                                         for r in busy), default=0.0), 1),
        },
        "websocket": {
            "connections": sum(len(r.ws) for r in reports),
            "reconnections": sum(max(0, len(r.ws) - 1) for r in reports),
            "failed_to_open": sum(not w.opened for r in reports for w in r.ws),
            "closed_by_server": dict(sorted(closes.items())),  # close code → count, before the client's end
        },
        "never_seated": sum(not r.token for r in reports),  # never got past the join link and the game page
        "gave_up": sum(bool(r.gave_up) for r in reports),
    }


# ---- the built-in server --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shareable_database() -> dict[str, Any]:
    from django.conf import settings

    databases = settings.DATABASES
    name = str(databases["default"].get("NAME") or "")
    if databases["default"]["ENGINE"].endswith("sqlite3") and (name in ("", ":memory:") or "mode=memory" in name):
        raise SimulationError("The built-in server runs in its own process and cannot see an in-memory SQLite "
                              "database. Use a file database or PostgreSQL, or pass --server.")
    return databases


@contextlib.contextmanager
def builtin_server(*, port: int | None = None, startup_timeout: float = 60.0) -> Iterator[str]:
    """Run the platform (uvicorn, current settings and database) on 127.0.0.1 while the block runs."""
    databases = _shareable_database()
    if port is not None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise SimulationError(f"Port {port} on 127.0.0.1 is in use; choose another with --port.") from None
    port = port or free_port()
    env = {**os.environ, SERVER_ENV: json.dumps({"port": port, "databases": databases}, default=str)}
    root = Path(__file__).resolve().parent.parent
    with tempfile.NamedTemporaryFile("w+b", prefix="partnerlab-sim-server-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        proc = subprocess.Popen([sys.executable, "-c", "from experiment.simulation import serve; serve()"],
                                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc, startup_timeout, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.returncode in (0, -15):
            log_path.unlink(missing_ok=True)
        else:
            logger.warning("built-in server exited with %s; its log: %s", proc.returncode, log_path)


def wait_for_health(url: str, proc: subprocess.Popen[bytes], timeout: float, log_path: Path) -> None:
    """Block until ``url``/healthz answers 200; SimulationError with the log's end if the process dies."""
    parts = urllib.parse.urlsplit(url)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise SimulationError(f"The server exited with {proc.returncode} while starting:\n{tail}")
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=2)
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        conn.close()
        time.sleep(0.2)
    raise SimulationError(f"The built-in server did not answer {url}/healthz within {timeout:.0f} s (log: {log_path}).")


def serve() -> None:
    """Entry point of the built-in server's process: the parent's settings module and database."""
    config = json.loads(os.environ.pop(SERVER_ENV))
    from django.conf import settings

    # Before anything opens a connection: the parent may run on a database its settings do not name
    # (pytest-django's test database, for one).
    settings.DATABASES = config["databases"]
    import uvicorn

    uvicorn.run("config.asgi:application", host="127.0.0.1", port=config["port"], lifespan="on", log_level="warning")


# ---- one simulated session (manage.py simulate, manage.py power) ------------------------------------------

@dataclass
class SimulationRun:
    session_id: int
    session_code: str
    seed: int
    server_url: str
    reports: list[ClientReport]
    summary: dict[str, Any]


def game_budget_seconds(params: Any, *, slack_per_phase: float = 3.0) -> float:
    """Longest a group can take from its first phase to its end if every phase runs to its deadline."""
    from experiment.game import phases_of_round

    return sum(params.durations[phase] + slack_per_phase
               for r in range(1, params.n_rounds + 1) for phase in phases_of_round(r, params))


def simulate(*, experiment: Any, groups: int, seed: int, server_url: str | None = None,
             params: SyntheticParams | None = None, time_scale: float = 1.0, port: int | None = None,
             time_limit: float | None = None, progress: Callable[[str], None] | None = None) -> SimulationRun:
    """Create a session for ``groups`` groups of synthetic humans, play it over real connections, summarise.

    Without ``server_url`` the built-in server runs for the duration of the call. With it, the server
    must use the database this process uses (the session is created here, through the ORM).
    """
    from experiment.models import Group, Participant, Session

    if groups < 1:
        raise SimulationError("--groups must be at least 1.")
    if time_scale <= 0:
        raise SimulationError("--time-scale must be greater than 0.")
    if server_url is not None:
        parts = urllib.parse.urlsplit(server_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SimulationError(f"--server must be an http(s) URL such as http://127.0.0.1:8000, not {server_url!r}.")
    base = params or SyntheticParams()
    human = SyntheticHuman(dataclasses.replace(base, speed=base.speed * time_scale),
                           quiz_key={str(i): q["answer"] for i, q in enumerate(experiment.quiz)})
    game_params = experiment.params()
    per_group = experiment.n_humans
    session = Session.objects.create(experiment=experiment, capacity=groups * per_group, seed=seed,
                                     label=f"simulation: {groups} groups, seed {seed}")
    if time_limit is None:
        pre_game = sum(hi for stage, (_, hi) in _stage_times().items()) * human.params.speed * (2 if base.quiz_error else 1)
        time_limit = game_budget_seconds(game_params) + pre_game + 60
    lobby_actions = frozenset({"quiz.submit"} if experiment.quiz else {"instructions.done"})
    with contextlib.nullcontext(server_url.rstrip("/")) if server_url else builtin_server(port=port) as url:
        if progress:
            progress(f"Session {session.code} (seed {seed}): {groups} groups of {per_group} synthetic humans on {url}")
        started = time.monotonic()
        reports = asyncio.run(run_clients(base_url=url, code=session.code, count=groups * per_group, human=human,
                                          seed=seed, group_size=per_group, ordered=True, lobby_actions=lobby_actions,
                                          time_limit=time_limit))
        duration = time.monotonic() - started
    group_of = dict(Participant.objects.filter(session=session, controller=Participant.Controller.PERSON)
                    .values_list("token", "group_id"))
    summary = summarize(reports, group_of=group_of, duration=duration)
    summary.update(stored_counts(session_id=session.pk))
    budget = game_budget_seconds(game_params)
    stalled = [g.number for g in Group.objects.filter(session=session)
               if g.status != Group.Status.FINISHED or (g.finished_at - g.created_at).total_seconds() > budget]
    summary.update({"experiment": experiment.slug, "session": session.code, "seed": seed, "server": url,
                    "groups": groups, "groups_formed": Group.objects.filter(session=session).count(),
                    "groups_stalled": stalled, "time_scale": time_scale})
    return SimulationRun(session_id=session.pk, session_code=session.code, seed=seed, server_url=url, reports=reports,
                         summary=summary)


def _stage_times() -> dict[str, tuple[float, float]]:
    from bots.synthetic import TIMES

    return {s: TIMES[s] for s in ("consent", "instructions", "quiz", "questionnaire")}


def stored_counts(*, session_id: int) -> dict[str, Any]:
    """What the server stored for a session: groups completed, rounds settled, rows per table."""
    from experiment.models import Belief, Choice, Group, Message, Return, RoundPayoff

    rounds = (RoundPayoff.objects.filter(participant__session_id=session_id)
              .values("participant__group_id", "round_number").distinct().count())
    return {
        "groups_completed": Group.objects.filter(session_id=session_id, status=Group.Status.FINISHED).count(),
        "rounds": rounds,
        "stored": {
            "messages": Message.objects.filter(group__session_id=session_id).count(),
            "choices": Choice.objects.filter(group__session_id=session_id).count(),
            "returns": Return.objects.filter(choice__group__session_id=session_id).count(),
            "beliefs": Belief.objects.filter(group__session_id=session_id).count(),
            "timed_out_choices": Choice.objects.filter(group__session_id=session_id, timed_out=True).count(),
        },
    }


def session_tables(*, session_id: int) -> dict[str, list[tuple[Any, ...]]]:
    """The decisions and payoffs of a session as plain, ordered tuples (no ids): equal for equal runs."""
    from experiment.models import Belief, Choice, Message, Participant, RoundPayoff

    choices = (Choice.objects.filter(group__session_id=session_id)
               .order_by("group__number", "round_number", "selector__seat")
               .values_list("group__number", "group__condition__name", "round_number", "selector__seat",
                            "candidate__seat", "position", "label_shown", "sent", "multiplied",
                            "return_decision__returned", "timed_out"))
    messages = (Message.objects.filter(group__session_id=session_id)
                .order_by("group__number", "round_number", "candidate__seat")
                .values_list("group__number", "round_number", "candidate__seat", "text", "timed_out"))
    beliefs = (Belief.objects.filter(group__session_id=session_id)
               .order_by("group__number", "round_number", "selector__seat", "candidate__seat")
               .values_list("group__number", "round_number", "selector__seat", "candidate__seat", "guess",
                            "confidence", "timed_out"))
    payoffs = (RoundPayoff.objects.filter(participant__session_id=session_id)
               .order_by("participant__group__number", "round_number", "participant__seat")
               .values_list("participant__group__number", "round_number", "participant__seat", "points"))
    seats = (Participant.objects.filter(session_id=session_id, group__isnull=False)
             .order_by("group__number", "seat")
             .values_list("group__number", "seat", "role", "kind", "controller", "status", "payoff"))
    return {"choices": list(choices), "messages": list(messages), "beliefs": list(beliefs), "payoffs": list(payoffs),
            "seats": list(seats)}
