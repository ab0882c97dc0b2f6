"""``manage.py simulate`` against the built-in server (a real uvicorn process) and the load benchmark's
machinery against the production stack. Synthetic participants join over HTTP and play over real
websockets; nothing here writes a decision into the database directly."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from experiment import replay
from experiment.models import Choice, Group, Message, Participant, QuestionnaireResponse, Return, RoundPayoff, Session
from experiment.simulation import session_tables
from tests import factories

pytestmark = [pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 2
# Long enough that synthetic humans (at most 60 % into a phase) and scripted bots always act in time,
# even on a busy machine; the feedback phase is short to keep the test quick.
PHASES = {"pitch_seconds": 5, "choice_seconds": 5, "return_seconds": 5, "feedback_seconds": 1, "belief_seconds": 5}


def _port() -> int | None:
    """A port from PARTNERLAB_TEST_PORTS ("8601-8619") when set, else any free port."""
    spec = os.environ.get("PARTNERLAB_TEST_PORTS")
    if not spec:
        return None
    first, _, last = spec.partition("-")
    for port in range(int(first), int(last or first) + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {spec}")


@pytest.fixture
def shareable_database():
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3") and str(db["NAME"]) in ("", ":memory:"):
        pytest.skip("the built-in server runs in its own process and cannot share an in-memory SQLite database")


def _experiment():
    return factories.experiment_create(n_rounds=ROUNDS, belief_rounds="last", **PHASES)


def _simulate(experiment, *, groups: int, seed: int) -> dict:
    out = io.StringIO()
    call_command("simulate", experiment=experiment.slug, groups=groups, seed=seed, time_scale=0.02, port=_port(),
                 json=True, stdout=out)
    return json.loads(out.getvalue())


def test_two_groups_play_to_the_end_and_store_every_decision(shareable_database) -> None:
    experiment = _experiment()
    summary = _simulate(experiment, groups=2, seed=11)

    assert summary["errors"] == 0, summary["error_examples"]
    assert summary["groups_completed"] == 2 and summary["groups_stalled"] == []
    assert summary["clients"] == 10 and summary["clients_by_stage"] == {"finished": 10}
    assert summary["rounds"] == 2 * ROUNDS
    session = Session.objects.get(code=summary["session"])
    assert session.seed == 11
    groups = list(Group.objects.filter(session=session))
    assert len(groups) == 2 and all(g.status == Group.Status.FINISHED for g in groups)
    # 3 selectors, 4 candidates (2 of them scripted bots) per group; belief in the last round only.
    choices = Choice.objects.filter(group__session=session)
    assert choices.count() == 2 * 3 * ROUNDS
    assert Return.objects.filter(choice__group__session=session).count() == choices.exclude(candidate=None).count()
    assert Message.objects.filter(group__session=session).count() == 2 * 4 * ROUNDS
    assert RoundPayoff.objects.filter(participant__session=session).count() == 2 * 7 * ROUNDS
    assert summary["stored"]["beliefs"] == 2 * 3 * 4
    people = Participant.objects.filter(session=session, controller=Participant.Controller.PERSON)
    assert people.count() == 10 and set(people.values_list("status", flat=True)) == {Participant.Status.FINISHED}
    assert QuestionnaireResponse.objects.filter(participant__session=session).count() == 10
    # Every human decision went over the websocket: the client counted an ack for each stored one.
    human_decisions = (Choice.objects.filter(group__session=session, timed_out=False).count()
                       + Message.objects.filter(group__session=session, timed_out=False,
                                                candidate__controller=Participant.Controller.PERSON).count()
                       + Return.objects.filter(choice__group__session=session, timed_out=False,
                                               candidate__controller=Participant.Controller.PERSON).count()
                       + 2 * 3)  # one belief submission per selector
    assert summary["decisions"] == human_decisions
    assert summary["ack_ms"]["n"] >= summary["decisions"] and summary["phase_change_ms"]["n"] > 0
    # A session played over websockets, with its real concurrency and clocks, replays as stored (issue 19).
    result = replay.replay(session.pk)
    assert (result.refused, [str(d) for d in result.differences]) == ([], [])
    assert result.identical and result.inputs > 100


def test_same_seed_same_decisions_and_payoffs(shareable_database) -> None:
    experiment = _experiment()
    first = _simulate(experiment, groups=2, seed=23)
    second = _simulate(experiment, groups=2, seed=23)
    assert first["errors"] == second["errors"] == 0
    a = session_tables(session_id=Session.objects.get(code=first["session"]).pk)
    b = session_tables(session_id=Session.objects.get(code=second["session"]).pk)
    assert len(a["choices"]) == 2 * 3 * ROUNDS and len(a["payoffs"]) == 2 * 7 * ROUNDS
    for table in ("choices", "messages", "beliefs", "payoffs", "seats"):
        assert a[table] == b[table], table
    # Not trivially equal: the two groups of one run play differently.
    by_group = {g: [row[2:] for row in a["choices"] if row[0] == g] for g in (1, 2)}
    assert by_group[1] != by_group[2]


def test_unknown_experiment_is_a_clear_error() -> None:
    with pytest.raises(CommandError, match="No experiment with slug 'nope'"):
        call_command("simulate", experiment="nope", groups=1)


def test_bad_behaviour_option_is_a_clear_error_and_creates_nothing() -> None:
    experiment = _experiment()
    with pytest.raises(CommandError, match="dropout must be between 0 and 1"):
        call_command("simulate", experiment=experiment.slug, groups=1, behaviour=["dropout=3"])
    assert not Session.objects.filter(experiment=experiment).exists()


@pytest.mark.production_stack
def test_load_benchmark_machinery(production_services) -> None:
    """bench/load.py end to end at toy size: uvicorn workers, Celery with beat, its own database and Redis db."""
    database = "partnerlab_load_smoke"
    port = _port() or 8611
    done = subprocess.run(
        [sys.executable, "bench/load.py", "--participants", "15", "--rounds", "1", "--phase-seconds", "5",
         "--time-scale", "0.05", "--ramp-seconds", "1", "--duration-limit", "300", "--port", str(port),
         "--database", database, "--redis-db", "14", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=420, check=False)
    assert done.returncode in (0, 2), f"{done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout)
    assert report["errors"] == 0, report["error_examples"]
    # Participants are seats, human or bot: 15 make two whole groups of 7 (5 synthetic humans and 2 bots each).
    assert {k: report["config"][k] for k in ("participants", "synthetic_humans", "bot_seats", "groups")} == {
        "participants": 14, "synthetic_humans": 10, "bot_seats": 4, "groups": 2}
    assert report["groups_stalled"] == [] and report["groups_completed"] == 2
    assert report["clients_by_stage"] == {"finished": 10}
    assert report["stored"]["choices"] == 2 * 3 and report["stored"]["messages"] == 2 * 4
    assert report["ack_ms"]["n"] >= 10 * 4 and report["phase_change_ms"]["n"] > 0
    assert report["cpu"]["uvicorn_cores"] > 0 and report["cpu"]["celery_cores"] > 0
    # Every answer of the join link and the game page by status; busy answers only if the pool ran short.
    assert report["http_status_by_page"]["join"].get("302") == 10 and report["http_status_by_page"]["play"].get("200") == 10
    assert report["http_5xx"] == 0 and report["never_seated"] == 0 and report["gave_up"] == 0 and report["unplaced"] == 0
    assert report["busy"]["clients_lost"] == 0
    db = report["resources"]["db_connections"]
    assert db["database"] == database and db["peak"] > 0 and db["samples"] > 0 and db["max_connections"] > 0
    assert set(report["limits"]) == {"cpu", "db_connections", "redis", "event_loop", "load_generator", "server_errors"}
    assert report["resources"]["healthz_ms"]["n"] > 0
    assert report["target_met"] == (report["target_missed"] == []) == (done.returncode == 0)
    # It cleaned up after itself.
    with psycopg.connect("postgres://postgres@127.0.0.1:5432/postgres") as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is None


# ---- the client's busy and reconnection behaviour, against a tiny real server ------------------------------------

class TinyServer:
    """A real HTTP and websocket server on 127.0.0.1 that plays a script: the answers to the join link and the
    game page in order (the last one repeats), and what each websocket connection does in order. It records
    every request it got, so the tests see what the client actually sent and when."""

    def __init__(self, *, join: list[tuple], play: list[tuple], ws: list[tuple]) -> None:
        self.script = {"join": join, "play": play}
        self.ws_script = ws
        self.requests: list[tuple[float, str, str, str]] = []  # (monotonic, page, target, cookie)
        self.connections = 0

    def _http(self, connection, request):
        page = "join" if request.path.startswith("/join/") else "play" if request.path.startswith("/play/") else None
        if page is None:
            return None  # the websocket: go on with the handshake
        self.requests.append((time.monotonic(), page, request.path, request.headers.get("Cookie", "")))
        answers = self.script[page]
        status, headers = answers[min(sum(r[1] == page for r in self.requests), len(answers)) - 1]
        response = connection.respond(status, "ok" if status == 200 else f"answer {status}")
        for name, value in headers.items():
            response.headers[name] = value
        return response

    async def _handler(self, connection) -> None:
        self.connections += 1
        steps = self.ws_script[min(self.connections, len(self.ws_script)) - 1]
        for step in steps:
            if isinstance(step, int):
                await connection.close(code=step)
                return
            await connection.send(json.dumps(step))
        await connection.wait_closed()

    @contextlib.asynccontextmanager
    async def running(self):
        from websockets.asyncio.server import serve

        async with serve(self._handler, "127.0.0.1", 0, process_request=self._http) as server:
            port = server.sockets[0].getsockname()[1]
            yield f"http://127.0.0.1:{port}"


def _state(stage: str, version: int) -> dict:
    return {"type": "state", "version": version, "stage": stage, "me": {"seat": "S1", "role": "selector"}, "game": None}


REDIRECT = (302, {"Location": "/play/tok1/", "Set-Cookie": "partnerlab_seat=abc; Path=/; HttpOnly"})
GAME_PAGE = (200, {})
FINISHED = [_state("finished", 1)]


async def _client(url: str, **options):
    from bots.synthetic import SyntheticHuman
    from experiment.simulation import SimClient

    client = SimClient(index=3, base_url=url, code="CODE", human=SyntheticHuman(), seed=5, rng_group=3, **options)
    return await asyncio.wait_for(client.run(), 30)


async def test_client_waits_retry_after_on_a_busy_answer_and_asks_the_same_url_again() -> None:
    from experiment.simulation import BUSY_CLOSE_CODE, connection_summary

    server = TinyServer(join=[(503, {"Retry-After": "1"}), REDIRECT], play=[(503, {"Retry-After": "0"}), GAME_PAGE],
                        ws=[[BUSY_CLOSE_CODE], FINISHED])
    async with server.running() as url:
        report = await _client(url)

    assert report.errors == [] and report.stage == "finished" and report.gave_up == ""
    assert [(h.page, h.status, h.retry_after) for h in report.http] == [
        ("join", 503, 1.0), ("join", 302, None), ("play", 503, 0.0), ("play", 200, None)]
    joins = [r for r in server.requests if r[1] == "join"]
    assert joins[0][2] == joins[1][2] and "PROLIFIC_PID=SIM5x3" in joins[0][2]  # the same URL, the same person
    assert joins[1][0] - joins[0][0] >= 0.95  # it waited as long as Retry-After said
    assert report.http[0].waited == 1.0
    plays = [r for r in server.requests if r[1] == "play"]
    assert len(plays) == 2 and all("partnerlab_seat=abc" in r[3] for r in plays)  # with the seat's cookie, both times
    # The websocket's busy close is retried with the page's backoff (first retry: 0.25-0.5 s) and is no error.
    assert [(w.opened, w.close_code, w.busy, w.got_state) for w in report.ws] == [
        (True, BUSY_CLOSE_CODE, True, False), (True, None, False, True)]
    assert 0.25 <= report.ws[0].waited <= 0.5
    assert report.busy_answers == 3 and report.token == "tok1"

    summary = connection_summary([report], group_of={"tok1": 7})
    assert summary["http_status"] == {"200": 1, "302": 1, "503": 2}
    assert summary["http_status_by_page"] == {"join": {"302": 1, "503": 1}, "play": {"200": 1, "503": 1}}
    assert summary["http_5xx"] == 0 and summary["never_seated"] == 0 and summary["gave_up"] == 0
    assert summary["busy"] | {"longest_wait_s": None} == {"http_503": 2, "websocket": 1, "clients": 1, "clients_placed": 1,
                                                          "clients_lost": 0, "longest_wait_s": None}
    assert summary["websocket"]["reconnections"] == 1
    assert connection_summary([report], group_of={"tok1": None})["busy"]["clients_lost"] == 1  # joined, never placed


async def test_a_500_or_a_503_without_retry_after_is_an_error_and_not_retried() -> None:
    from experiment.simulation import connection_summary

    for answer in [(500, {}), (503, {})]:
        server = TinyServer(join=[answer, REDIRECT], play=[GAME_PAGE], ws=[FINISHED])
        async with server.running() as url:
            report = await _client(url)
        assert [e["code"] for e in report.errors] == ["http_5xx"], report.errors
        assert [h.status for h in report.http] == [answer[0]] and len(server.requests) == 1
        summary = connection_summary([report], group_of={})
        assert summary["http_5xx"] == 1 and summary["never_seated"] == 1 and summary["busy"]["clients"] == 0


async def test_client_gives_up_after_its_tries_and_caps_each_wait() -> None:
    from experiment.simulation import connection_summary

    server = TinyServer(join=[(503, {"Retry-After": "120"})], play=[GAME_PAGE], ws=[FINISHED])
    async with server.running() as url:
        started = time.monotonic()
        report = await _client(url, busy_tries=3, busy_max_wait=0.1)
        took = time.monotonic() - started

    assert took < 5 and len(server.requests) == 3
    assert [h.waited for h in report.http] == [0.1, 0.1, 0.0]
    assert [e["code"] for e in report.errors] == ["gave_up"] and report.gave_up.startswith("join:")
    summary = connection_summary([report], group_of={})
    assert summary["busy"]["clients_lost"] == 1 and summary["gave_up"] == 1 and summary["never_seated"] == 1


async def test_a_dropped_websocket_is_an_error_and_is_reconnected() -> None:
    server = TinyServer(join=[REDIRECT], play=[GAME_PAGE], ws=[[_state("lobby", 1), 1011], [_state("finished", 2)]])
    async with server.running() as url:
        report = await _client(url)

    assert report.stage == "finished" and report.gave_up == ""
    assert [e["code"] for e in report.errors] == ["closed"] and "1011" in report.errors[0]["message"]
    # It had a state before the drop, so the backoff starts afresh: 0.25-0.5 s.
    assert [(w.close_code, w.got_state) for w in report.ws] == [(1011, True), (None, True)]
    assert 0.25 <= report.ws[0].waited <= 0.5 and report.busy_answers == 0


async def test_a_websocket_that_stays_busy_is_given_up_after_its_tries() -> None:
    from experiment.simulation import BUSY_CLOSE_CODE

    server = TinyServer(join=[REDIRECT], play=[GAME_PAGE], ws=[[BUSY_CLOSE_CODE]])
    async with server.running() as url:
        report = await _client(url, ws_tries=3)

    assert [e["code"] for e in report.errors] == ["gave_up"] and report.gave_up.startswith("websocket:")
    assert server.connections == 4 and all(w.busy for w in report.ws)  # the first and 3 retries
    # The backoff grows: half to all of 0.5, 1 and 2 s.
    assert [w.waited for w in report.ws[:3]] == sorted(w.waited for w in report.ws[:3])
    assert 1.0 <= report.ws[2].waited <= 2.0 and report.ws[3].waited == 0.0


def test_retry_after_is_read_as_seconds_or_as_a_date() -> None:
    from email.utils import formatdate

    from experiment.simulation import parse_retry_after

    assert parse_retry_after("5") == 5.0 and parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None and parse_retry_after("-3") is None
    now = time.time()
    assert 9 <= parse_retry_after(formatdate(now + 10, usegmt=True), now=now) <= 10
    assert parse_retry_after(formatdate(now - 10, usegmt=True), now=now) == 0.0


def test_load_benchmark_scenarios_set_defaults_and_explicit_options_win() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)

    launch = load.parse_args(["--scenario", "launch"])
    assert (launch.groups, launch.time_scale, launch.ramp_seconds, launch.phase_seconds) == (100, 0.1, 30.0, 20)
    wider = load.parse_args(["--scenario", "launch", "--groups", "150", "--ramp-seconds", "10"])
    assert (wider.groups, wider.ramp_seconds, wider.time_scale) == (150, 10.0, 0.1)
    # An explicit size replaces the scenario's, whichever way it is given.
    sized = load.parse_args(["--scenario", "launch", "--participants", "70"])
    assert (sized.participants, sized.groups, sized.phase_seconds) == (70, None, 20)
    people = load.parse_args(["--scenario", "launch-people"])
    assert (people.participants, people.groups, people.ramp_seconds, people.time_scale) == (1000, None, 60.0, 1.0)
    plain = load.parse_args([])
    assert (plain.participants, plain.groups, plain.ramp_seconds, plain.scenario) == (1000, None, 120.0, None)


def _playing(version: int, round_number: int, phase: str) -> dict:
    return {"type": "state", "version": version, "stage": "playing", "me": {"seat": "S1", "role": "selector"},
            "game": {"round": round_number, "phase": phase, "todo": False, "phase_started": None, "deadline": None}}


async def test_a_client_told_to_leave_closes_its_tab_at_that_phase_and_never_comes_back() -> None:
    # The fault benchmark's dropouts: before the phase it stays (and here reaches the end) ...
    server = TinyServer(join=[REDIRECT], play=[GAME_PAGE], ws=[[_playing(1, 1, "pitch"), _state("finished", 2)]])
    async with server.running() as url:
        stays = await _client(url, leave_at=(1, "choice"))
    assert stays.stage == "finished" and stays.left_at is None and stays.errors == []

    # ... at it or past it (here round 2's choice, after round 1's return), it closes and opens no other websocket.
    server = TinyServer(join=[REDIRECT], play=[GAME_PAGE], ws=[[_playing(1, 2, "choice")], [_state("finished", 2)]])
    async with server.running() as url:
        leaves = await _client(url, leave_at=(1, "return"))
    assert leaves.left_phase == (2, "choice") and leaves.left_at is not None and leaves.errors == []
    assert server.connections == 1 and len(leaves.ws) == 1 and leaves.stage == "playing"
    assert leaves.ws[0].closed_at is not None and leaves.ws[0].closed_at >= leaves.ws[0].at
