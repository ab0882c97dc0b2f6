"""No database connection to be had (a launch's rush): a retrying 503 instead of a 500, nobody placed twice.

The outages here are real, not mocked: on PostgreSQL the pages run as a role with a ``CONNECTION LIMIT``
whose every slot the test has taken (the server answers ``FATAL: too many connections for role``, the
same refusal as ``too many clients already``), and, when ``psycopg_pool`` is installed, through Django's
native pool with its only connection taken (``PoolTimeout``). On the embedded default (SQLite) the
database file cannot be opened. Either way Django's own ``connect()`` fails, as it does in production.
"""

from __future__ import annotations

import contextlib
import html
import itertools
import json
import logging
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import connection, connections, transaction
from django.db.utils import OperationalError
from django.test import Client

from experiment import busy, consumers, services, views
from experiment.models import Event, Participant, Session
from tests import factories
from tests.experiment import gamekit
from tests.wsclient import Seat

executor_connections_closed = gamekit.executor_connections_closed
P = Participant
ROOT = Path(__file__).resolve().parents[2]
BUSY_TEXT = "The study is busy — this page retries by itself"


# ---- a real outage ------------------------------------------------------------------------------------------

class Outage:
    """Makes the database refuse every new connection while ``down()`` is entered; capacity returns on exit."""

    def __init__(self) -> None:
        self.settings = connections.settings["default"]
        assert connection.settings_dict is self.settings  # every thread's connection reads this same dict
        self.vendor = connection.vendor
        self._role = f"partnerlab_busy_{uuid.uuid4().hex[:10]}"
        self._user = self.settings["USER"]
        self._name = self.settings["NAME"]
        self._held: list[Any] = []
        if self.vendor == "postgresql":
            self._setup_role()

    # PostgreSQL: only while down() the pages connect as a role with CONNECTION LIMIT 3, every slot of which the
    # test holds. So no connection as the role ever opens for Django: none outlives the test in a worker thread
    # of the run (the consumers' pools), and the role can be dropped at the end of the test.
    def _admin(self, dbname: str | None = None):
        import psycopg

        s = self.settings
        return psycopg.connect(host=s["HOST"] or None, port=s["PORT"] or None, user=self._user,
                               password=s["PASSWORD"] or None, dbname=dbname or self._name, autocommit=True)

    def _setup_role(self) -> None:
        with contextlib.closing(self._admin()) as admin:
            admin.execute(f'CREATE ROLE "{self._role}" LOGIN NOSUPERUSER CONNECTION LIMIT 3')
            admin.execute(f'GRANT USAGE ON SCHEMA public TO "{self._role}"')
            admin.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{self._role}"')
            admin.execute(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{self._role}"')

    def _take_every_slot(self) -> None:
        import psycopg

        s = self.settings
        for _ in range(10):
            try:
                self._held.append(psycopg.connect(host=s["HOST"] or None, port=s["PORT"] or None, user=self._role,
                                                  password=s["PASSWORD"] or None, dbname=self._name))
            except psycopg.OperationalError as exc:
                assert "too many connections" in str(exc), exc
                return
        raise AssertionError("the role's connection limit did not hold")

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        connections.close_all()
        if self.vendor == "postgresql":
            self._take_every_slot()
            self.settings["USER"] = self._role
        else:  # SQLite: a file in a directory that does not exist cannot be opened
            self.settings["NAME"] = str(Path(self._name).parent / f"no-such-dir-{uuid.uuid4().hex}" / "db.sqlite3")
        try:
            yield
        finally:
            connections.close_all()
            for held in self._held:
                held.close()
            self._held.clear()
            self.settings["USER"], self.settings["NAME"] = self._user, self._name

    def close(self) -> None:
        connections.close_all()
        self.settings["USER"], self.settings["NAME"] = self._user, self._name
        if self.vendor == "postgresql":
            # Nothing to terminate: the only connections the role ever had were the test's own, closed above.
            with contextlib.closing(self._admin()) as admin:
                left = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", [self._role]).fetchone()
                assert left == (0,), f"connections as {self._role} outlived the outage: {left}"
                admin.execute(f'DROP OWNED BY "{self._role}"')
                admin.execute(f'DROP ROLE "{self._role}"')


@pytest.fixture
def outage(transactional_db: None) -> Iterator[Outage]:
    busy.report.reset()
    made = Outage()
    try:
        yield made
    finally:
        made.close()
        busy.report.reset()


@pytest.fixture
def session(transactional_db: None) -> Session:
    return factories.session_create(gamekit.experiment_small(), capacity=3)


def _client() -> Client:
    return Client(raise_request_exception=False)


def _token_of(response) -> str:
    assert response.status_code == 302, (response.status_code, response.content[:300])
    return response["Location"].removeprefix("/play/").rstrip("/")


def _assert_busy_page(response, url: str) -> int:
    """The 503 answer: Retry-After in the jittered window, the branded page, and a retry of ``url`` itself."""
    assert response.status_code == 503, (response.status_code, response.content[:500])
    seconds = int(response["Retry-After"])
    assert busy.RETRY_AFTER_MIN <= seconds <= busy.RETRY_AFTER_MAX
    assert response["Cache-Control"] == "no-store"
    page = response.content.decode()
    assert BUSY_TEXT in page
    assert "experiment/play.css" in page  # the participant pages' own look (the base template)
    refresh = re.search(r'<meta http-equiv="refresh" content="([^"]*)">', page)
    assert refresh, page
    assert html.unescape(refresh.group(1)) == f"{seconds};url={url}"
    assert f'href="{html.escape(url)}"' in page  # the "Try again now" link
    assert f'<span id="busy-seconds">{seconds}</span>' in page  # the countdown starts where the refresh fires
    return seconds


# ---- the pages -----------------------------------------------------------------------------------------------

def test_the_join_link_answers_busy_and_keeps_the_recruitment_ids(outage: Outage, session: Session) -> None:
    url = f"/join/{session.code}/?PROLIFIC_PID=P-busy.1&STUDY_ID=study_2&SESSION_ID=s3"
    with outage.down():
        response = _client().get(url)
    _assert_busy_page(response, url)
    assert not Participant.objects.exists()


def test_the_game_page_answers_busy(outage: Outage, session: Session) -> None:
    token = services.participant_join(session_id=session.pk).token
    with outage.down():
        response = _client().get(f"/play/{token}/?from=prolific")
    _assert_busy_page(response, f"/play/{token}/?from=prolific")
    assert _client().get(f"/play/{token}/").status_code == 200  # capacity is back: the page is there


def test_retry_after_is_jittered(outage: Outage, session: Session) -> None:
    with outage.down():
        seen = {int(_client().get(f"/join/{session.code}/")["Retry-After"]) for _ in range(25)}
    assert len(seen) > 1 and seen <= set(range(busy.RETRY_AFTER_MIN, busy.RETRY_AFTER_MAX + 1))


def test_a_retry_after_capacity_returns_places_the_person_once(outage: Outage, session: Session) -> None:
    url = f"/join/{session.code}/?PROLIFIC_PID=PID-RUSH"
    with outage.down():
        for _ in range(3):  # the page retried (or the person reloaded) while the database was still busy
            assert _client().get(url).status_code == 503
    first = _token_of(_client().get(url))
    again = _token_of(_client().get(url))  # another tab or browser, after the seat was made
    assert again == first
    assert Participant.objects.filter(session=session).count() == 1
    assert Event.objects.filter(session=session, type="participant.joined").count() == 1


def test_a_retry_with_the_seat_cookie_gets_the_same_seat(outage: Outage, session: Session) -> None:
    browser = _client()
    first = _token_of(browser.get(f"/join/{session.code}/"))  # no recruitment id: the cookie is the identity
    with outage.down():
        assert browser.get(f"/join/{session.code}/").status_code == 503
    assert _token_of(browser.get(f"/join/{session.code}/")) == first
    assert Participant.objects.filter(session=session).count() == 1


def test_a_join_that_failed_after_creating_the_seat_is_retried_into_that_seat(
        outage: Outage, session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first attempt got as far as committing the new seat; then the database went away before the
    answer was sent. The retry (same PROLIFIC_PID) gets that seat, not a second one."""
    real_join = services.participant_join
    failed = []

    def join_then_lose_the_database(**kwargs: Any) -> Participant:
        p = real_join(**kwargs)
        if not failed:
            failed.append(p.pk)
            with outage.down():
                Session.objects.filter(pk=kwargs["session_id"]).exists()  # the next query needs a new connection
        return p

    monkeypatch.setattr(views.services, "participant_join", join_then_lose_the_database)
    url = f"/join/{session.code}/?PROLIFIC_PID=PID-HALFWAY"
    assert _client().get(url).status_code == 503
    assert list(Participant.objects.values_list("pk", flat=True)) == failed  # the seat exists
    token = _token_of(_client().get(url))
    assert Participant.objects.get(token=token).pk == failed[0]
    assert Participant.objects.filter(session=session).count() == 1


def test_simultaneous_retries_of_one_person_make_one_seat(session: Session) -> None:
    """A retry can arrive while the first attempt is still being served: both get the same seat."""
    url = f"/join/{session.code}/?PROLIFIC_PID=PID-TWICE"
    start = threading.Barrier(4)
    tokens: list[str] = []
    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            start.wait(10)
            tokens.append(_token_of(_client().get(url)))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(tokens) == 4 and len(set(tokens)) == 1
    assert Participant.objects.filter(session=session).count() == 1


def test_staff_pages_answer_busy_and_a_form_is_not_resent(outage: Outage) -> None:
    staff = _client()
    staff.cookies["sessionid"] = "a" * 32  # a signed-in browser: its session is read from the database
    with outage.down():
        page = staff.get("/cockpit/")
        post = _client().post("/admin/login/", {"username": "x", "password": "y"})
    assert page.status_code == 503 and BUSY_TEXT in page.content.decode()
    assert post.status_code == 503 and "Retry-After" in post
    body = post.content.decode()
    assert BUSY_TEXT in body and 'http-equiv="refresh"' not in body and "send it again" in body


def test_json_clients_get_json(outage: Outage) -> None:
    with outage.down():
        response = _client().get("/api/", HTTP_ACCEPT="application/json", HTTP_AUTHORIZATION="Token " + "0" * 40)
    assert response.status_code == 503
    assert response.json()["retry_after"] == int(response["Retry-After"])


def test_busy_answers_are_logged_as_one_line(outage: Outage, session: Session, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with outage.down():
        for _ in range(5):
            assert _client().get(f"/join/{session.code}/?PROLIFIC_PID=LOGGED").status_code == 503
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warnings] == ["experiment.busy"], [(r.name, r.getMessage()) for r in warnings]
    (line,) = warnings
    assert line.exc_info is None and "\n" not in line.getMessage()
    assert "page join" in line.getMessage() and "LOGGED" not in line.getMessage()  # no recruitment id in the log


@pytest.mark.skipif("connection.vendor != 'postgresql'", reason="Django's connection pool is PostgreSQL's")
def test_an_exhausted_connection_pool_answers_busy(session: Session) -> None:
    pytest.importorskip("psycopg_pool")
    settings_dict = connections.settings["default"]
    connections.close_all()
    settings_dict["OPTIONS"]["pool"] = {"min_size": 0, "max_size": 1, "timeout": 0.5}
    try:
        pool = connection.pool
        pool.open()
        taken = pool.getconn()  # the pool's only connection: every request now waits 0.5 s, then PoolTimeout
        try:
            url = f"/join/{session.code}/?PROLIFIC_PID=POOLED"
            _assert_busy_page(_client().get(url), url)
        finally:
            pool.putconn(taken)
        token = _token_of(_client().get(url))
        assert _token_of(_client().get(url)) == token
        connection.close()
        assert Participant.objects.filter(session=session).count() == 1
    finally:
        connection.close()
        connection.close_pool()
        del settings_dict["OPTIONS"]["pool"]


# ---- what is not "busy" ----------------------------------------------------------------------------------------

def _failing_query() -> None:
    """A real OperationalError from a query on an open connection (not from getting one)."""
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL statement_timeout = 1")
            cursor.execute("SELECT pg_sleep(1)")  # canceling statement due to statement timeout
        else:
            cursor.execute("SELECT * FROM no_such_table")  # no such table


def test_an_ordinary_database_error_is_still_a_500(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OperationalError) as caught:
        _failing_query()
    assert not busy.connection_unavailable(caught.value)

    def join_with_a_bad_query(**kwargs: Any) -> Participant:
        _failing_query()
        raise AssertionError("unreachable")

    monkeypatch.setattr(views.services, "participant_join", join_with_a_bad_query)
    response = _client().get(f"/join/{session.code}/?PROLIFIC_PID=P500")
    assert response.status_code == 500
    assert "Retry-After" not in response and BUSY_TEXT not in response.content.decode()


def test_the_busy_page_never_sends_a_person_to_another_site() -> None:
    assert busy._same_site("/join/abc/?PROLIFIC_PID=x") == "/join/abc/?PROLIFIC_PID=x"
    for foreign in ("//evil.example/join/", "/\\evil.example/", "https://evil.example/"):
        assert busy._same_site(foreign) == "/", foreign


def test_other_exceptions_are_not_busy() -> None:
    assert not busy.connection_unavailable(RuntimeError("connect"))
    assert not busy.connection_unavailable(OperationalError("too many clients already"))  # not from connect()


def test_bad_input_is_answered_as_before(outage: Outage, session: Session) -> None:
    assert _client().get(f"/join/{session.code}/?PROLIFIC_PID=bad%20id").status_code == 403
    assert _client().get("/join/no-such-code/").status_code == 404
    assert _client().get("/play/no-such-token/").status_code == 404
    with outage.down():
        assert _client().post(f"/join/{session.code}/").status_code == 405  # refused before any database use
        assert _client().get("/healthz").status_code == 200  # needs no database
    assert not Participant.objects.exists()


# ---- the participant websocket ---------------------------------------------------------------------------------

async def _close_code(seat: Seat) -> int:
    connected, _ = await seat.comm.connect()
    assert connected  # accepted, so that the close code reaches the client
    message = await seat.comm.receive_output(timeout=10)
    assert message["type"] == "websocket.close", message
    return message["code"]


@pytest.mark.django_db(transaction=True)
async def test_the_websocket_closes_with_try_again_later_and_works_when_capacity_returns(outage: Outage) -> None:
    token = (await database_sync_to_async(_joined)()).token
    with outage.down():
        code = await _close_code(Seat(token))
    assert code == busy.BUSY_CLOSE_CODE
    seat = await Seat(token).connect()
    assert seat.state["stage"] == "consent"
    await seat.close()
    assert await database_sync_to_async(_connections_of)(token) == 0


@pytest.mark.django_db(transaction=True)
async def test_the_websocket_undoes_its_presence_when_the_state_cannot_be_read(
        outage: Outage, monkeypatch: pytest.MonkeyPatch) -> None:
    token = (await database_sync_to_async(_joined)()).token
    real_state = consumers.seat_state

    def state_without_a_connection(participant_id: int) -> Any:
        connections.close_all()
        with outage.down():
            return real_state(participant_id)

    monkeypatch.setattr(consumers, "seat_state", state_without_a_connection)
    assert await _close_code(Seat(token)) == busy.BUSY_CLOSE_CODE
    monkeypatch.setattr(consumers, "seat_state", real_state)
    assert await database_sync_to_async(_connections_of)(token) == 0  # counted open, then closed again
    seat = await Seat(token).connect()
    assert seat.state["stage"] == "consent"
    await seat.close()


def _joined() -> Participant:
    try:
        return services.participant_join(session_id=factories.session_create(gamekit.experiment_small(), capacity=3).pk)
    finally:
        connections.close_all()


def _connections_of(token: str) -> int:
    try:
        return Participant.objects.get(token=token).connections
    finally:
        connections.close_all()


# ---- the game page's reconnect loop (play.js in Node, with a fake DOM, fake timers and a fake WebSocket) -----------

# Runs the real static/experiment/play.js: two simulated minutes of a server that accepts and closes at once with
# 4503, then twenty seconds of one that sends a state and drops the connection a second later. Node is not one
# of the project's requirements: without it the test is skipped.
HARNESS = r"""
// Runs static/experiment/play.js in node with a minimal fake DOM, fake timers and a fake WebSocket.
"use strict";
const vm = require("vm");
const fs = require("fs");

const script = fs.readFileSync(process.argv[2], "utf8");
const START = Date.UTC(2026, 0, 1);
let now = 0;
let seq = 0;
const timers = [];
function addTimer(fn, ms, every) { const id = ++seq; timers.push({ id, at: now + Math.max(0, Number(ms) || 0), fn, every }); return id; }
function clearTimer(id) { const i = timers.findIndex((t) => t.id === id); if (i >= 0) timers.splice(i, 1); }
function runFor(ms) {
  const end = now + ms;
  for (;;) {
    timers.sort((a, b) => a.at - b.at || a.id - b.id);
    const t = timers[0];
    if (!t || t.at > end) break;
    now = t.at;
    if (t.every) t.at += Math.max(1, t.every); else timers.shift();
    t.fn();
  }
  now = end;
}
class FakeDate extends Date {
  constructor(...args) { if (args.length) super(...args); else super(START + now); }
  static now() { return START + now; }
}

class Node {}
class Text extends Node { constructor(t) { super(); this.data = t; } get text() { return this.data; } }
class El extends Node {
  constructor(tag) {
    super();
    this.tagName = String(tag).toUpperCase();
    this.children = [];
    this.attrs = {};
    this.hidden = false; this.disabled = false; this.checked = false; this.required = false;
    this.value = ""; this.className = ""; this.id = "";
    const classes = new Set();
    this.classList = { add: (c) => classes.add(c), remove: (c) => classes.delete(c), contains: (c) => classes.has(c),
      toggle: (c, on) => {
        const want = on === undefined ? !classes.has(c) : !!on;
        if (want) classes.add(c); else classes.delete(c);
        return want;
      } };
    this.style = { setProperty() {} };
  }
  set textContent(t) { this.children = [new Text(String(t))]; }
  get textContent() { return this.text; }
  get text() { return this.children.map((c) => c.text).join(""); }
  get firstChild() { return this.children[0] || null; }
  setAttribute(k, v) { this.attrs[k] = String(v); if (k === "id") this.id = String(v); }
  getAttribute(k) { return k in this.attrs ? this.attrs[k] : null; }
  removeAttribute(k) { delete this.attrs[k]; }
  addEventListener() {}
  appendChild(c) { this.children.push(c); return c; }
  insertBefore(c) { this.children.unshift(c); return c; }
  replaceChildren(...c) { this.children = c; }
  contains() { return false; }
  closest() { return null; }
  focus() {}
  find(id) {
    if (this.id === id) return this;
    for (const c of this.children) { if (c instanceof El) { const f = c.find(id); if (f) return f; } }
    return null;
  }
}

const body = new El("body");
const app = new El("div");
app.setAttribute("id", "app");
app.setAttribute("data-ws-path", "/ws/play/test-token/");
body.appendChild(app);
const opened = [];
let mode = "busy";
function stateEvent() {
  return { type: "state", version: 0, server_time: new FakeDate().toISOString(), stage: "consent",
    me: { seat: "", role: "", name: "Participant", colour: null },
    experiment: { rounds: 3, endowment: 10, multiplier: 3, message_max_chars: 200, fixed_send: false, belief_rounds: [] },
    consent: { text: "Consent text." } };
}
function FakeWebSocket(url) {
  const self = this;
  opened.push(now);
  const asked = mode;
  addTimer(() => {
    if (self.onopen) self.onopen({});
    if (asked === "busy") { if (self.onclose) self.onclose({ code: 4503 }); return; }
    if (self.onmessage) self.onmessage({ data: JSON.stringify(stateEvent()) });
    addTimer(() => { if (self.onclose) self.onclose({ code: 1006 }); }, 1000);
  }, 0);
}
FakeWebSocket.prototype.send = function () {};
FakeWebSocket.prototype.close = function () {};

const storage = new Map();
const sandbox = {
  Node, Date: FakeDate, WebSocket: FakeWebSocket, console,
  setTimeout: (fn, ms) => addTimer(fn, ms, 0), clearTimeout: clearTimer,
  setInterval: (fn, ms) => addTimer(fn, ms, ms), clearInterval: clearTimer,
  location: { protocol: "http:", host: "partnerlab.test" },
  navigator: {},
  sessionStorage: { getItem: (k) => (storage.has(k) ? storage.get(k) : null), setItem: (k, v) => storage.set(k, String(v)) },
  document: {
    body, title: "", activeElement: null, visibilityState: "visible",
    getElementById: (id) => body.find(id),
    createElement: (tag) => new El(tag),
    createTextNode: (t) => new Text(t),
    addEventListener() {},
  },
  addEventListener() {}, scrollTo() {},
};
sandbox.window = sandbox;
vm.createContext(sandbox);
vm.runInContext(script, sandbox, { filename: "play.js" });

const banner = () => (body.children[0].hidden ? "" : body.children[0].text);
runFor(120000);
const busy = { opened: opened.slice(), banner: banner() };
mode = "state";
runFor(20000);
console.log(JSON.stringify({ busy, back: { opened: opened.slice(busy.opened.length), page: app.text, banner: banner() } }));
"""


def test_the_game_page_backs_off_with_jitter_while_the_server_is_busy(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("needs Node.js to run play.js outside a browser")
    (tmp_path / "harness.js").write_text(HARNESS)
    out = subprocess.run([node, str(tmp_path / "harness.js"), str(ROOT / "static" / "experiment" / "play.js")],
                         capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    opened = result["busy"]["opened"]
    gaps = [b - a for a, b in itertools.pairwise(opened)]
    assert len(gaps) >= 8, gaps
    for n, gap in enumerate(gaps):  # the n-th wait in a row: between half and all of min(15 s, 0.5 s * 2^n)
        ceiling = min(15_000, 500 * 2**n)
        assert ceiling / 2 <= gap <= ceiling, (n, gap, gaps)
    assert len({round(gap / min(15_000, 500 * 2**n), 3) for n, gap in enumerate(gaps)}) > len(gaps) // 2, gaps  # jitter
    assert result["busy"]["banner"].startswith("The study is busy right now. Reconnecting by itself"), result["busy"]
    # Once a connection brings a state the backoff starts afresh: 1 s connected, then a wait of at most 0.5 s.
    back = result["back"]
    assert "Consent text." in back["page"], back
    assert len(back["opened"]) >= 3, back
    assert all(1000 <= b - a <= 1500 for a, b in itertools.pairwise(back["opened"])), back
    assert "busy" not in back["banner"], back  # connected (no banner) or "Connection lost. …", never "busy"
