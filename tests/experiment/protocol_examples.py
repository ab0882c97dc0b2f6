"""The JSON examples of docs/protocol.md, captured from games played over the participant websocket.

Every ```json block of the doc has a marker on the line before its fence, ``<!-- example: NAME -->``.
:func:`capture` plays the games and returns, by name, what each block must contain;
tests/experiment/test_protocol_examples.py compares the doc with it and, with
``--update-protocol-examples``, writes it into the doc.

The games run in-process: real consumers (channels' WebsocketCommunicator), services and scripted bots,
on the test database and channel layer. Only three things are the harness's own:

- the clock: ``django.utils.timezone.now`` is a :class:`Clock` that this script moves on (people take
  their time, phases run to their deadline), so every timestamp the server sends is the same in every run;
- automated seats act when the script says so (their scheduled jobs are run then), and phases that nobody
  closes end at their deadline through ``services.sweep``, as the scheduler's sweep would do;
- the session code and the seat tokens of the join example become ``<session code>`` and ``<token>``, and
  the guesses of ``game.beliefs`` are shown in the order of the candidate cards (:func:`in_stable_order`).

A fixed session seed makes the groups' randomness (seats, candidate orders, bots' decisions) the same in
every run and on every database.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import difflib
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

from django.db import connections
from django.test import Client
from django.utils import timezone

from experiment import consumers, services
from experiment.models import Participant, Session
from tests import factories
from tests.experiment import gamekit
from tests.wsclient import Seat

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
UPDATE_OPTION = "--update-protocol-examples"
UPDATE_COMMAND = f".venv/bin/python -m pytest tests/experiment/test_protocol_examples.py {UPDATE_OPTION}"

SEED = 20260302
START = datetime(2026, 3, 2, 9, 0, 4, 118406, tzinfo=UTC)
WIDTH = 140  # a value is printed on one line when it fits, indentation included (the project's line length)

db = gamekit.db

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)")


# ---- the doc's blocks ---------------------------------------------------------------------------------------

MARKER = re.compile(r"<!-- example: ([a-z0-9]+(?:-[a-z0-9]+)*) -->")
FENCE = re.compile(r"\s*(`{3,}|~{3,})\s*(\S*)")


@dataclass(frozen=True)
class Block:
    name: str
    start: int  # index of the first line of the body (the line after the opening fence)
    end: int  # index of the closing fence
    body: str


def blocks(text: str) -> tuple[list[Block], list[str]]:
    """The marked JSON blocks of a Markdown text, and what is wrong with its markers: a JSON block without a
    marker, a marker not followed by a JSON block, a name used twice, a block that is never closed."""
    lines = text.split("\n")
    found: list[Block] = []
    problems: list[str] = []
    i = 0
    while i < len(lines):
        marker = MARKER.fullmatch(lines[i].strip())
        if marker:
            fence = FENCE.fullmatch(lines[i + 1]) if i + 1 < len(lines) else None
            if not fence or "json" not in fence[2].lower():
                problems.append(f"line {i + 1}: the marker of {marker[1]!r} is not on the line just before a ```json fence")
        fence = FENCE.fullmatch(lines[i])
        if not fence:
            i += 1
            continue
        close = next((j for j in range(i + 1, len(lines))
                      if (m := FENCE.fullmatch(lines[j])) and m[1][0] == fence[1][0] and len(m[1]) >= len(fence[1])
                      and not m[2]), None)
        if close is None:
            problems.append(f"line {i + 1}: a code block that is never closed")
            break
        if "json" in fence[2].lower():
            marker = MARKER.fullmatch(lines[i - 1].strip()) if i > 0 else None
            if marker is None:
                problems.append(f"line {i + 1}: a ```json block without an <!-- example: NAME --> marker on the line before "
                                f"(every example is captured by {Path(__file__).name})")
            elif any(b.name == marker[1] for b in found):
                problems.append(f"line {i}: the example name {marker[1]!r} is used twice")
            else:
                found.append(Block(marker[1], i + 1, close, "\n".join(lines[i + 1:close])))
        i = close + 1
    return found, problems


def rewrite(text: str, bodies: dict[str, str]) -> str:
    """``text`` with the body of every marked block replaced by ``bodies[name]`` (and nothing else changed)."""
    lines = text.split("\n")
    found, problems = blocks(text)
    if problems:
        raise ValueError("; ".join(problems))
    for block in sorted(found, key=lambda b: b.start, reverse=True):
        lines[block.start:block.end] = bodies[block.name].split("\n")
    return "\n".join(lines)


def differences(text: str, bodies: dict[str, str]) -> list[str]:
    """Every way in which the doc's examples differ from a capture, each with a diff (empty: none)."""
    found, problems = blocks(text)
    out = list(problems)
    names = [b.name for b in found]
    for name in sorted(set(bodies) - set(names)):
        out.append(f"example {name!r} was captured but docs/protocol.md has no block marked <!-- example: {name} -->")
    for name in names:
        if name not in bodies:
            out.append(f"the block marked {name!r} in docs/protocol.md is not captured by {Path(__file__).name}")
    for block in found:
        want = bodies.get(block.name)
        if want is not None and block.body != want:
            diff = "\n".join(difflib.unified_diff(block.body.split("\n"), want.split("\n"), f"docs/protocol.md ({block.name})",
                                                  "captured", lineterm=""))
            out.append(f"example {block.name!r} (docs/protocol.md line {block.start}) differs from the capture:\n{diff}")
    return out


# ---- printing -----------------------------------------------------------------------------------------------

def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def pretty(value: dict[str, Any]) -> str:
    """Indented by two, every value on one line where it fits in :data:`WIDTH` (the top level never)."""
    def lines(v: Any, level: int, prefix: str, suffix: str, *, top: bool = False) -> list[str]:
        pad = "  " * level
        flat = f"{pad}{prefix}{compact(v)}{suffix}"
        if not isinstance(v, dict | list) or not v or (len(flat) <= WIDTH and not top):
            return [flat]
        items = list(v.items()) if isinstance(v, dict) else [(None, x) for x in v]
        out = [f"{pad}{prefix}{'{' if isinstance(v, dict) else '['}"]
        for n, (key, x) in enumerate(items):
            out += lines(x, level + 1, "" if key is None else f"{compact(key)}: ", "," if n < len(items) - 1 else "")
        out.append(f"{pad}{'}' if isinstance(v, dict) else ']'}{suffix}")
        return out

    return "\n".join(lines(value, 0, "", "", top=True))


def in_stable_order(frame: dict[str, Any]) -> dict[str, Any]:
    """The frame with the one object whose key order the server leaves to the database put in a fixed order:
    ``game.beliefs`` (read without an ORDER BY: SQLite gives the order of insertion, PostgreSQL not always),
    in the order of the selector's candidate cards."""
    game = frame.get("game")
    if not game or not game.get("beliefs"):
        return frame
    order = [c["seat"] for c in game["candidates"]]
    beliefs = dict(sorted(game["beliefs"].items(), key=lambda item: order.index(item[0])))
    return {**frame, "game": {**game, "beliefs": beliefs}}


class Examples:
    """What the doc's blocks must contain, by name."""

    def __init__(self) -> None:
        self.bodies: dict[str, str] = {}

    def frame(self, name: str, frame: dict[str, Any], *keys: str) -> None:
        """One frame, indented; with ``keys``, only those of its fields (the doc shows the rest once)."""
        frame = in_stable_order(frame)
        self._add(name, pretty({k: frame[k] for k in keys} if keys else frame))

    def lines(self, name: str, frames: list[dict[str, Any]]) -> None:
        """Several frames or messages, one per line."""
        self._add(name, "\n".join(compact(f) for f in frames))

    def _add(self, name: str, body: str) -> None:
        assert name not in self.bodies, f"example {name!r} captured twice"
        self.bodies[name] = body


# ---- the harness ----------------------------------------------------------------------------------------------

class Clock:
    """The server's ``timezone.now`` during a capture: stands still until the script moves it on."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Person(Seat):
    """A participant's connection that numbers its messages ("P1-1", "P1-2", …) and keeps every frame."""

    def __init__(self, label: str, token: str) -> None:
        super().__init__(token)
        self.label, self.token = label, token
        self.sent: list[dict[str, Any]] = []
        self._refs = itertools.count(1)

    async def say(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a message (with the next ``ref``) and return its reply."""
        message = {**message, "ref": f"{self.label}-{next(self._refs)}"}
        self.sent.append(message)
        return await self.send(message)

    async def ok(self, message: dict[str, Any]) -> dict[str, Any]:
        reply = await self.say(message)
        assert reply["type"] == "ack", (self.label, message, reply)
        return reply

    async def frame(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15) -> dict[str, Any]:
        """The first frame received so far (or, waiting, from now on) that satisfies ``predicate``."""
        end = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.log[seen:]:
                if predicate(event):
                    return event
            seen = len(self.log)
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.label} never received the frame; last: {json.dumps(self.log[-1:])[:1500]}")
            try:
                await self._pump(left)
            except TimeoutError:
                continue

    @property
    def seat(self) -> str:
        return self.state["me"]["seat"]

    def message(self, kind: str, n: int = 0) -> dict[str, Any]:
        """The ``n``-th message of a type this person sent."""
        return [m for m in self.sent if m["type"] == kind][n]


def stage(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f["type"] == "state" and f["stage"] == name


def in_phase(r: int, phase: str, **want: Any) -> Callable[[dict[str, Any]], bool]:
    """A state of round ``r``, ``phase`` whose game fields have the given values (a callable: is true of them)."""
    def match(f: dict[str, Any]) -> bool:
        g = f.get("game") if f["type"] == "state" else None
        return (g is not None and (g["round"], g["phase"]) == (r, phase)
                and all(v(g.get(k)) if callable(v) else g.get(k) == v for k, v in want.items()))
    return match


def not_none(v: Any) -> bool:
    return v is not None


@db
def _session(*, label: str, fill_after: int | None = None, conditions: tuple[tuple[str, bool], ...], **design: Any) -> Session:
    experiment = factories.experiment_create(conditions=conditions, **design)
    return Session.objects.create(experiment=experiment, label=label, capacity=1000, synthetic_fill_after=fill_after,
                                  seed=SEED)


@db
def _join_by_link(code: str, pid: str) -> tuple[dict[str, Any], str]:
    """A browser opens the join link: the exchange as the doc shows it, and the seat's token."""
    url = f"/join/{code}/?PROLIFIC_PID={pid}"
    response = Client().get(url)
    location = response["Location"]
    token = re.fullmatch(r"/play/([A-Za-z0-9_-]{32})/", location)
    assert re.fullmatch(r"[A-Za-z0-9_-]{12}", code) and token, (code, location)
    return {"GET": url.replace(code, "<session code>"), "status": response.status_code,
            "Location": location.replace(token[1], "<token>")}, token[1]


@db
def _join(session: Session, pid: str) -> str:
    return services.participant_join(session_id=session.pk, prolific_pid=pid).token


@db
def _onboard(token: str) -> None:
    p = Participant.objects.select_related("session__experiment").get(token=token)
    services.consent_submit(participant_id=p.pk, accept=True)
    services.instructions_done(participant_id=p.pk)
    services.quiz_submit(participant_id=p.pk, answers=factories.quiz_answers(p.session.experiment))


@db
def _choose(token: str, candidate: str, amount: int) -> None:
    p = Participant.objects.select_related("group").get(token=token)
    services.choice_submit(participant_id=p.pk, round_number=p.group.round_number, candidate=candidate, amount=amount)


@db
def _group_id(token: str) -> int:
    return Participant.objects.get(token=token).group_id


async def _bots_act() -> int:
    """The automated seats' scheduled actions, now."""
    return await db(gamekit.run_seat_jobs)()


async def _deadline(clock: Clock, seconds: float) -> None:
    """Let time run past the phase's deadline; the sweep closes the phase."""
    clock.advance(seconds)
    await db(services.sweep)()


PITCHES = ["Hi! I send back half of whatever I get. Let's both win.", "fair deal: pick me, I return 2/3 <3"]
ANSWERS = {"age": 25, "gender": "prefer not to say", "ai_attitude": 4, "suspected_bots": "not sure", "comments": ""}
PROLIFIC_URL = "https://app.prolific.com/submissions/complete?cc=PLCOMPLETE"


async def capture() -> dict[str, str]:
    """Play the games and return the text of every example, by name. Needs the test database."""
    clock = Clock()
    ex = Examples()
    people: list[Person] = []
    try:
        with mock.patch.object(timezone, "now", clock):
            await _demo_game(clock, ex, people)
            await _other_endings(clock, ex, people)
    finally:
        for person in people:
            await person.close()
        await _close_thread_connections()
    return ex.bodies


async def _close_thread_connections() -> None:
    """Close the database connections that the consumers' work left open on the threads it ran on (the seat
    views' pool, the event loop's default executor), so that the test database can be dropped when the tests end
    (on PostgreSQL an open connection prevents that)."""
    pools = [consumers._view_threads.get(), asyncio.get_running_loop()._default_executor]
    for pool in pools:
        if pool is not None:
            await asyncio.to_thread(_close_on_every_thread, pool)


def _close_on_every_thread(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """Every (idle) thread of the pool runs one call: each waits for the others before returning."""
    threads = len(pool._threads)
    if not threads:
        return
    everyone = threading.Barrier(threads, timeout=10)

    def close() -> None:
        connections.close_all()
        everyone.wait()

    for done in [pool.submit(close) for _ in range(threads)]:
        done.result()


async def _demo_game(clock: Clock, ex: Examples, people: list[Person]) -> None:
    """The demo design (3 selectors; 2 human and 2 bot candidates; 3 rounds, a belief phase in the last), in its
    ``disclosed`` arm, in a session that fills empty seats after 10 s in the lobby (as the demo session): five
    people join by link and play every phase."""
    session = await _session(label="demo", fill_after=10, conditions=(("disclosed", True),), n_rounds=3)
    for n in range(1, 6):
        exchange, token = await _join_by_link(session.code, f"P{n}")
        if n == 1:
            ex.frame("http-join", exchange)
        people.append(await Person(f"P{n}", token).connect())
        clock.advance(1.273)
    p1 = people[0]

    # -- before the lobby: one person, step by step (the others are like them)
    ex.frame("state-consent", await p1.frame(stage("consent")))
    await p1.ok({"type": "ping"})
    malformed = await p1.send_raw('{"type": "consent", "accept": tru')
    clock.advance(6.481)
    await p1.ok({"type": "consent", "accept": True})
    ex.frame("state-instructions", await p1.frame(stage("instructions")))
    clock.advance(21.337)
    await p1.ok({"type": "instructions.done"})
    await p1.frame(stage("quiz"))
    clock.advance(14.062)
    wrong = await p1.ok({"type": "quiz.submit", "answers": {"0": "7", "1": "The candidate"}})
    ex.frame("state-quiz", await p1.frame(lambda f: stage("quiz")(f) and f["quiz"]["attempts"] == 1))
    clock.advance(5.719)
    right = await p1.ok({"type": "quiz.submit", "answers": {"0": "12", "1": "The candidate"}})
    ex.lines("ack-quiz", [wrong, right])
    ex.frame("state-lobby", await p1.frame(stage("lobby")))
    for person in people[1:]:
        clock.advance(1.906)
        await person.ok({"type": "consent", "accept": True})
        await person.ok({"type": "instructions.done"})
        await person.ok({"type": "quiz.submit", "answers": {"0": "12", "1": "The candidate"}})

    # -- the group forms with the fifth person in the lobby
    for person in people:
        await person.frame(in_phase(1, "pitch"))
    selectors = sorted((p for p in people if p.state["me"]["role"] == "selector"), key=lambda p: p.seat)
    writers = sorted((p for p in people if p.state["me"]["role"] == "candidate"), key=lambda p: p.seat)
    assert len(selectors) == 3 and len(writers) == 2
    s1, s2, s3 = selectors
    hx, hy = writers
    cards = {c["seat"]: c for c in s1.state["game"]["candidates"]}
    b1, b2 = sorted(seat for seat, c in cards.items() if c["label"] == "AI bot")
    texts = {hx: PITCHES[0], hy: PITCHES[1]}
    returns = {hx: lambda m: m // 2, hy: lambda m: m * 2 // 3}

    async def pitch(r: int) -> None:
        clock.advance(8.418)
        for writer in writers:
            await writer.ok({"type": "pitch.submit", "round": r, "text": texts[writer]})
            clock.advance(5.203)
        assert await _bots_act() == 2
        for person in people:
            await person.frame(in_phase(r, "choice"))

    async def choose(r: int, plan: list[tuple[Person, str, int]]) -> None:
        for selector, candidate, amount in plan:
            clock.advance(7.552)
            await selector.ok({"type": "choice.submit", "round": r, "candidate": candidate, "amount": amount})

    async def give_back(r: int) -> None:
        """The human candidates return their share; the bots theirs; the round's feedback opens."""
        for writer in writers:
            state = await writer.frame(in_phase(r, "return"))
            for owed in state["game"]["to_return"]:
                clock.advance(6.127)
                await writer.ok({"type": "return.submit", "round": r, "selector": owed["selector"],
                                 "amount": returns[writer](owed["multiplied"])})
        await _bots_act()
        for person in people:
            await person.frame(in_phase(r, "feedback"))

    async def feedback_ends(r: int) -> None:
        await _deadline(clock, 15.004)
        following = (r + 1, "pitch") if r < 3 else (r, "belief")
        for person in people:
            await person.frame(in_phase(*following))

    # -- round 1: every phase as each role sees it
    ex.frame("state-pitch-candidate-before", await hx.frame(in_phase(1, "pitch", todo=True)))
    ex.frame("state-pitch-selector", await s1.frame(in_phase(1, "pitch")), "game")
    clock.advance(8.418)
    await hx.ok({"type": "pitch.submit", "round": 1, "text": texts[hx]})
    ex.frame("state-pitch-candidate-after", await hx.frame(in_phase(1, "pitch", my_message=not_none)), "game")
    ex.lines("progress", [await s1.frame(lambda f: f["type"] == "progress" and f["done"] == 1)])
    clock.advance(5.203)
    await hy.ok({"type": "pitch.submit", "round": 1, "text": texts[hy]})
    clock.advance(3.886)
    assert await _bots_act() == 2
    ex.frame("state-choice-candidate", await hx.frame(in_phase(1, "choice")), "game")
    await s1.frame(in_phase(1, "choice"))
    clock.advance(9.145)
    too_much = await s1.say({"type": "choice.submit", "round": 1, "candidate": hx.seat, "amount": 11})
    ex.lines("error", [too_much, malformed])
    clock.advance(3.027)
    ack = await s1.ok({"type": "choice.submit", "round": 1, "candidate": hx.seat, "amount": 8})
    ex.lines("ack-choice", [ack])
    ex.frame("state-choice-selector-after", await s1.frame(in_phase(1, "choice", my_choice=not_none)), "game")
    await choose(1, [(s2, hy.seat, 6), (s3, hy.seat, 4)])
    ex.frame("state-return-candidate-two", await hy.frame(in_phase(1, "return")), "game")
    ex.frame("state-return-selector", await s1.frame(in_phase(1, "return")), "game")
    await give_back(1)
    ex.frame("state-feedback-selector", await s1.frame(in_phase(1, "feedback")), "game")
    ex.frame("state-feedback-candidate", await hx.frame(in_phase(1, "feedback")), "game")
    await feedback_ends(1)

    # -- round 2: history from round 1; the experimenter pauses the group for a while
    await pitch(2)
    ex.frame("state-choice-selector-before", await s1.frame(in_phase(2, "choice")), "game")
    clock.advance(12.664)
    group_id = await _group_id(s1.token)
    await db(services.group_pause)(group_id=group_id, actor_id=None)
    # (These states are read when they are sent: each must be in before the clock moves on.)
    paused = {person.label: await person.frame(in_phase(2, "choice", paused=True)) for person in people}
    ex.frame("state-paused", paused[s2.label], "game")
    clock.advance(48.302)
    await db(services.group_resume)(group_id=group_id, actor_id=None)
    for person in people:
        version = paused[person.label]["version"]
        await person.frame(lambda f, v=version: in_phase(2, "choice", paused=False)(f) and f["version"] > v)
    await choose(2, [(s1, b1, 5), (s2, hx.seat, 7), (s3, b2, 3)])
    await give_back(2)
    await feedback_ends(2)

    # -- round 3: a candidate nobody chose; the belief phase
    await pitch(3)
    await choose(3, [(s1, hx.seat, 4), (s2, b1, 6), (s3, b2, 2)])
    ex.frame("state-return-candidate-none", await hy.frame(in_phase(3, "return")), "game")
    await give_back(3)
    await feedback_ends(3)
    ex.frame("state-belief-selector-before", await s1.frame(in_phase(3, "belief")), "game")
    ex.frame("state-belief-candidate", await hx.frame(in_phase(3, "belief")), "game")
    for n, selector in enumerate(selectors):
        state = await selector.frame(in_phase(3, "belief"))
        guesses = {c["seat"]: {"guess": "human" if (i + n) % 2 == 0 else "bot", "confidence": 60 + 10 * i}
                   for i, c in enumerate(state["game"]["candidates"])}
        clock.advance(11.81)
        await selector.ok({"type": "belief.submit", "round": 3, "beliefs": guesses})
        if selector is s1:
            ex.frame("state-belief-selector-after", await s1.frame(in_phase(3, "belief", beliefs=lambda b: bool(b))), "game")

    # -- after the game
    ex.frame("state-questionnaire", await s1.frame(stage("questionnaire")))
    clock.advance(33.49)
    await s1.ok({"type": "questionnaire.submit", "answers": ANSWERS})
    ex.frame("state-finished", await s1.frame(stage("finished")))
    ex.lines("client-messages", [p1.message("consent"), p1.message("instructions.done"), p1.message("quiz.submit", 1),
                                 hx.message("pitch.submit"), s1.message("choice.submit", 1), hx.message("return.submit"),
                                 s1.message("belief.submit"), s1.message("questionnaire.submit"), p1.message("ping")])


async def _other_endings(clock: Clock, ex: Examples, people: list[Person]) -> None:
    """The other final stages, in sessions of a design with two human selectors and two bot candidates that
    sends participants back to Prolific: declining consent, waiting out the lobby, missing two decisions."""
    design = {"n_selectors": 2, "n_candidates": 2, "n_bot_candidates": 2, "n_rounds": 3,
              "completion_redirect_url": PROLIFIC_URL}
    clock.advance(300.25)
    session = await _session(label="pilot", conditions=(("hidden", False),), **design)
    declines = await Person("Q1", await _join(session, "Q1")).connect()
    people.append(declines)
    clock.advance(9.372)
    await declines.ok({"type": "consent", "accept": False})
    ex.frame("end-declined", await declines.frame(stage("declined")), "end")

    waits = await Person("Q2", await _join(session, "Q2")).connect()
    people.append(waits)
    await _onboard(waits.token)
    await waits.frame(stage("lobby"))
    await _deadline(clock, 600.5)
    ex.frame("end-lobby-timeout", await waits.frame(stage("lobby_timeout")), "end")

    session = await _session(label="pilot 2", conditions=(("hidden", False),), **design)
    misses, other = await _join(session, "Q3"), await _join(session, "Q4")
    await _onboard(misses)
    await _onboard(other)
    away = await Person("Q3", misses).connect()
    people.append(away)
    for r in range(1, 4):
        assert await _bots_act() == 2  # the bots' pitches
        await away.frame(in_phase(r, "choice"))
        await _choose(other, "B", 6)
        if r == 1:
            clock.advance(10.5)
            await away.ok({"type": "choice.submit", "round": 1, "candidate": "A", "amount": 4})
        else:
            await _deadline(clock, 60.5)  # away misses the choice
        if r < 3:
            await _bots_act()  # the bots' returns
            await away.frame(in_phase(r, "feedback"))
            await _deadline(clock, 15.004)
    ex.frame("end-dropped", await away.frame(stage("dropped")), "end")
