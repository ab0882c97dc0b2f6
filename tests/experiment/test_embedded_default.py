"""The embedded default, as a new user starts it: `make run` on a fresh SQLite file, then one person plays
the demo session alone over HTTP and a real websocket while synthetic participants fill the other seats.

No PostgreSQL, no Redis: SQLite, the in-memory channel layer and the in-process scheduler inside the
uvicorn process. Runs everywhere (it needs no services), so it is never skipped.
"""

from __future__ import annotations

import asyncio
import http.cookies
import json
import re
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

from tests.livestack import PYTHON, ROOT, LiveSeat, Proc, Processes, clean_env, free_ports, http_get, run_command

START_SECONDS = 180  # `make run` migrates a fresh database first; a bound, not an expectation
RESTART_LIMIT_SECONDS = 5.0  # issue #2: "after a restart ... overdue phases are closed within 5 seconds"


class Embedded:
    def __init__(self, procs: Processes, tmp: Path) -> None:
        self.procs = procs
        self.port = free_ports(1)[0]
        self.db = tmp / "partnerlab.sqlite3"
        # Its own SQLite file and its own var/ (the generated admin password): nothing of the checkout's is touched.
        self.env = clean_env(PARTNERLAB_SQLITE_PATH=str(self.db), PARTNERLAB_VAR_DIR=str(tmp / "var"))

    def make_run(self) -> Proc:
        """Exactly `make run` (its install step is skipped: this interpreter's environment is already installed)."""
        return self.procs.start("make-run", ["make", "--no-print-directory", "-o", ".venv/.installed", "run",
                                             f"PY={PYTHON}", "HOST=127.0.0.1", f"PORT={self.port}"], env=self.env)

    def uvicorn(self, name: str) -> Proc:
        """The server command of `make run` alone (the database is already migrated)."""
        return self.procs.start(name, [PYTHON, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1",
                                       "--port", str(self.port), "--lifespan", "on"], env=self.env)

    def manage(self, *args: str, code: str | None = None) -> str:
        argv = [PYTHON, "manage.py", *args] + (["-c", code] if code is not None else [])
        return run_command(argv, env=self.env, timeout=120)

    def shell_json(self, code: str) -> Any:
        """Run Python in `manage.py shell` against this instance's database; it prints one JSON line last."""
        return json.loads(self.manage("shell", code=code).strip().splitlines()[-1])

    def group_where(self, group_id: int) -> tuple[int, str, str]:
        with sqlite3.connect(self.db, timeout=10) as db:
            return db.execute("SELECT round_number, phase, status FROM experiment_group WHERE id = ?", (group_id,)).fetchone()


@pytest.fixture
def embedded(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Embedded]:
    procs = Processes(tmp_path)
    failed_before = request.session.testsfailed
    try:
        yield Embedded(procs, tmp_path)
    finally:
        procs.stop_all()
        if request.session.testsfailed > failed_before:
            procs.dump()


def _join(port: int, link: str, **query: str) -> str:
    """Open a join link as a browser does, follow the redirect to the game page, return the seat token."""
    parts = urlsplit(link)
    assert parts.netloc == f"127.0.0.1:{port}", link
    status, headers, _ = http_get(port, f"{parts.path}?{urlencode(query)}" if query else parts.path)
    assert status == 302, status
    play = urlsplit(headers["location"]).path
    token = re.fullmatch(r"/play/([^/]+)/", play)
    assert token, headers["location"]
    status, _, page = http_get(port, play)
    assert status == 200 and f"/ws/play/{token.group(1)}/" in page, page[:500]
    return token.group(1)


def _admin_login_works(port: int, password: str) -> bool:
    status, headers, page = http_get(port, "/admin/login/")
    assert status == 200
    cookie = http.cookies.SimpleCookie(headers["set-cookie"])["csrftoken"].value
    form_token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    status, headers, _ = http_get(port, "/admin/login/?next=/admin/", method="POST",
                                  body=urlencode({"username": "admin", "password": password, "csrfmiddlewaretoken": form_token,
                                                  "next": "/admin/"}),
                                  headers={"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"csrftoken={cookie}"})
    return status == 302 and headers["location"] == "/admin/"


# Shorter phases than the demo's (60 s), so the test plays a whole game in seconds rather than minutes.
_SPEED_UP_DEMO = """
import json
from experiment.models import Experiment
e = Experiment.objects.get(slug="demo")
e.n_rounds, e.belief_rounds = 2, "last"
e.pitch_seconds = e.choice_seconds = e.return_seconds = e.belief_seconds = 4
e.feedback_seconds = 2
e.save()
s = e.sessions.get(label="demo")
s.synthetic_fill_after = 1
s.save()
print(json.dumps({"answers": {str(i): q["answer"] for i, q in enumerate(e.quiz)}, "session": s.pk}))
"""

_STORED = """
import json
from experiment.models import Belief, Choice, Group, Message, Participant, QuestionnaireResponse, RoundPayoff
g = Group.objects.get(session_id=%(session)d)
print(json.dumps({
    "group": {"status": g.status, "condition": g.condition.name, "disclose": g.condition.disclose_identity},
    "seats": [{"seat": p.seat, "role": p.role, "kind": p.kind, "controller": p.controller, "status": p.status,
               "payoff": p.payoff, "pid": p.prolific_pid, "study": p.study_id, "rsid": p.recruitment_session_id,
               "token": p.token} for p in g.participants.all()],
    "messages": [[m.round_number, m.candidate.seat, m.text, m.timed_out] for m in Message.objects.filter(group=g)],
    "choices": [{"round": c.round_number, "selector": c.selector.seat, "candidate": c.candidate.seat if c.candidate else None,
                 "sent": c.sent, "multiplied": c.multiplied, "timed_out": c.timed_out,
                 "returned": c.return_decision.returned, "return_timed_out": c.return_decision.timed_out}
                for c in Choice.objects.filter(group=g).select_related("selector", "candidate", "return_decision")],
    "payoffs": [[rp.participant.seat, rp.round_number, rp.points]
                for rp in RoundPayoff.objects.filter(participant__group=g).select_related("participant")],
    "beliefs": Belief.objects.filter(group=g).count(),
    "questionnaires": list(QuestionnaireResponse.objects.filter(participant__group=g).values_list("participant__seat", flat=True)),
}))
"""


async def _play_alone(seat: LiveSeat, answers: dict[str, str]) -> dict[tuple[int, str], Any]:
    """Play every decision of this seat as soon as it is due; return what was sent, by (round, phase)."""
    await seat.connect()
    await seat.onboard(answers)
    await seat.until(lambda s: s["stage"] == "playing", timeout=60)  # synthetic participants fill the group
    sent: dict[tuple[int, str], Any] = {}

    def due(s: dict[str, Any]) -> bool:
        return s["stage"] != "playing" or (s["game"]["todo"] and (s["game"]["round"], s["game"]["phase"]) not in sent)

    while (state := await seat.until(due, timeout=60))["stage"] == "playing":
        g = state["game"]
        r, phase = g["round"], g["phase"]
        if phase == "pitch":
            sent[(r, phase)] = f"Round {r}: I always give back half."
            await seat.act({"type": "pitch.submit", "round": r, "text": sent[(r, phase)]})
        elif phase == "choice":
            sent[(r, phase)] = (g["candidates"][0]["seat"], 6)
            await seat.act({"type": "choice.submit", "round": r, "candidate": g["candidates"][0]["seat"], "amount": 6})
        elif phase == "return":
            sent[(r, phase)] = {t["selector"]: t["multiplied"] // 3 for t in g["to_return"]}
            for selector, amount in sent[(r, phase)].items():
                await seat.act({"type": "return.submit", "round": r, "selector": selector, "amount": amount})
        elif phase == "belief":
            sent[(r, phase)] = {c["seat"]: {"guess": "human", "confidence": 60} for c in g["candidates"]}
            await seat.act({"type": "belief.submit", "round": r, "beliefs": sent[(r, phase)]})
    assert state["stage"] == "questionnaire", state
    await seat.act({"type": "questionnaire.submit",
                    "answers": {"age": 41, "gender": "female", "ai_attitude": 6, "suspected_bots": "not sure", "comments": ""}})
    end = await seat.until(lambda s: s["stage"] == "finished")
    sent[(0, "end")] = end["end"]
    await seat.close()
    return sent


def test_make_run_then_one_person_plays_the_demo_alone(embedded: Embedded) -> None:
    server = embedded.make_run()
    link = server.wait_for_log(r"Participant link: +(\S+)", timeout=START_SECONDS).group(1)
    admin = server.wait_for_log(r"Admin: +(\S+) +user: admin +password: (\S+)", timeout=5)
    assert "ready on the embedded default (SQLite, no other servers)" in server.log()
    server.wait_for_log(r"Demo session: +id \d+ \(manage.py export --session \d+ --out DIR\)", timeout=5)
    server.wait_for_http(embedded.port, timeout=START_SECONDS)
    assert admin.group(1) == f"http://127.0.0.1:{embedded.port}/admin/"
    assert _admin_login_works(embedded.port, admin.group(2))
    demo = embedded.shell_json(_SPEED_UP_DEMO)

    token = _join(embedded.port, link, PROLIFIC_PID="P-alone", STUDY_ID="ST1", SESSION_ID="SE1")
    seat = LiveSeat(port=embedded.port, token=token, name="alone")
    sent = asyncio.run(_play_alone(seat, demo["answers"]))

    stored = embedded.shell_json(_STORED % {"session": demo["session"]})
    assert stored["group"]["status"] == "finished"
    seats = {s["seat"]: s for s in stored["seats"]}
    me = next(s for s in stored["seats"] if s["token"] == token)
    assert (me["controller"], me["status"], me["pid"], me["study"], me["rsid"]) == ("person", "finished", "P-alone", "ST1", "SE1")
    others = [s for s in stored["seats"] if s is not me]
    # Every other seat is automated: synthetic humans in the human seats, scripted bots in the bot seats.
    assert sorted((s["kind"], s["controller"]) for s in others) == sorted(
        [("human", "synthetic")] * 4 + [("bot", "scripted")] * 2)
    assert all(s["status"] == "finished" for s in others)
    assert sent[(0, "end")]["completion_code"] and sent[(0, "end")]["payoff"] == me["payoff"]

    assert len(stored["messages"]) == 4 * 2 and len(stored["choices"]) == 3 * 2
    for r, seat_name, text, timed_out in stored["messages"]:
        if seat_name == me["seat"]:
            assert (text, timed_out) == (sent[(r, "pitch")], False)
    for c in stored["choices"]:
        assert c["multiplied"] == 3 * c["sent"] and 0 <= c["returned"] <= c["multiplied"]
        if c["selector"] == me["seat"]:
            assert ((c["candidate"], c["sent"]), c["timed_out"]) == (sent[(c["round"], "choice")], False)
        if c["candidate"] == me["seat"]:
            assert (c["returned"], c["return_timed_out"]) == (sent[(c["round"], "return")][c["selector"]], False)
    for seat_name, r, points in stored["payoffs"]:
        if seats[seat_name]["role"] == "selector":
            c = next(c for c in stored["choices"] if (c["round"], c["selector"]) == (r, seat_name))
            assert points == 10 - c["sent"] + c["returned"]
        else:
            assert points == sum(c["multiplied"] - c["returned"] for c in stored["choices"]
                                 if (c["round"], c["candidate"]) == (r, seat_name))
    for s in stored["seats"]:
        assert s["payoff"] == sum(p for name, _, p in stored["payoffs"] if name == s["seat"])
    assert len(stored["payoffs"]) == 7 * 2
    assert stored["beliefs"] == 3 * 4
    assert me["seat"] in stored["questionnaires"]
    assert "Traceback" not in server.log()


_RESTART_SETUP = """
import json
from experiment.models import Condition, Experiment, Session
e = Experiment.objects.create(name="Restart", slug="restart", n_rounds=1, pitch_seconds=6, choice_seconds=6,
                              return_seconds=3, feedback_seconds=1, belief_seconds=3)
Condition.objects.create(experiment=e, name="hidden", disclose_identity=False)
s = Session.objects.create(experiment=e, label="restart", capacity=5, synthetic_fill_after=1)
print(json.dumps({"code": s.code, "answers": {str(i): q["answer"] for i, q in enumerate(e.quiz)}}))
"""


def test_server_restart_closes_overdue_phase_within_5_seconds(embedded: Embedded) -> None:
    embedded.manage("migrate", "--noinput")
    setup = embedded.shell_json(_RESTART_SETUP)
    first = embedded.uvicorn("uvicorn-1")
    first.wait_for_http(embedded.port, timeout=START_SECONDS)
    token = _join(embedded.port, f"http://127.0.0.1:{embedded.port}/join/{setup['code']}/")

    async def into_game() -> dict[str, Any]:
        seat = await LiveSeat(port=embedded.port, token=token).connect()
        await seat.onboard(setup["answers"])
        # The first phase in which this person owes a decision (pitch for a candidate, choice for a
        # selector): it cannot end before its deadline, because the person never decides.
        state = await seat.until(lambda s: s["stage"] == "playing" and s["game"]["todo"], timeout=60)
        await seat.close()  # no browser stays open
        return state

    state = asyncio.run(into_game())
    waiting = (1, state["game"]["phase"])
    group_id = embedded.shell_json(f"import json; from experiment.models import Participant as P; "
                                   f"print(json.dumps(P.objects.get(token={token!r}).group_id))")
    assert embedded.group_where(group_id)[:2] == waiting
    first.kill()  # a crash: the in-process timers die with the process
    deadline = datetime.fromisoformat(state["game"]["deadline"]).timestamp()
    while time.time() < deadline + 1.0:
        time.sleep(0.1)
    assert embedded.group_where(group_id)[:2] == waiting, "the phase closed while no server was running"

    second = embedded.uvicorn("uvicorn-2")
    while embedded.group_where(group_id)[:2] == waiting:
        assert second.running, second.tail()
        assert time.monotonic() - second.started_at < 60, "the overdue phase was never closed"
        time.sleep(0.05)
    elapsed = time.monotonic() - second.started_at
    print(f"overdue phase closed {elapsed:.2f} s after the server was restarted")
    assert elapsed < RESTART_LIMIT_SECONDS, f"closed {elapsed:.2f} s after the restart"
    # The restarted server's scheduler carries the game on to its end, with nobody connected.
    end = time.monotonic() + 60
    while embedded.group_where(group_id)[2] != "finished":
        assert time.monotonic() < end, f"the group stalled at {embedded.group_where(group_id)}"
        time.sleep(0.2)


def test_the_makefile_is_what_the_embedded_test_runs() -> None:
    """Guard against drift: the commands `make run` runs are the ones this module relies on."""
    dry = run_command(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "run", "PY=python",
                       "HOST=127.0.0.1", "PORT=1"], env=clean_env())
    assert dry.splitlines() == [
        "python manage.py migrate --noinput",
        "python manage.py demo_setup --base-url http://127.0.0.1:1",
        "python -m uvicorn config.asgi:application --host 127.0.0.1 --port 1 --lifespan on",
    ], dry
    assert (ROOT / "Makefile").exists()
