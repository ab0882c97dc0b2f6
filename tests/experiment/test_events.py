"""The protocol's declarations (experiment/events.py) match what actually goes over the wire:
every frame the server sends during a whole game has the keys and basic types of its TypedDict,
and every client message type is accepted by ``actions.dispatch`` in the shape declared for it."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, NotRequired, get_args, get_origin

import pytest

from experiment import actions, events, services
from experiment.models import Participant
from tests import factories
from tests.experiment import gamekit
from tests.wsclient import Seat

P = Participant
db = gamekit.db
executor_connections_closed = gamekit.executor_connections_closed

SECTION_OF_STAGE = {"consent": "consent", "instructions": "instructions", "quiz": "quiz", "lobby": "lobby",
                    "playing": "game", "questionnaire": "questionnaire"}
SECTIONS = {"consent", "instructions", "quiz", "lobby", "game", "questionnaire", "end"}
ANSWERS = {"age": 30, "gender": "female", "ai_attitude": 5, "suspected_bots": "yes", "comments": ""}


# ---- a small structural checker for TypedDict declarations ------------------------------------------------

def _fields(td: type) -> tuple[dict[str, Any], set[str]]:
    """Field types and required keys. (``__required_keys__`` cannot be trusted here: with postponed
    annotations Python 3.11 reports NotRequired fields as required.)"""
    hints = typing.get_type_hints(td, include_extras=True)
    required, fields = set(), {}
    for key, hint in hints.items():
        if get_origin(hint) is NotRequired:
            hint = get_args(hint)[0]
        else:
            required.add(key)
        fields[key] = hint
    return fields, required


def _problems(value: Any, hint: Any, where: str) -> list[str]:
    origin = get_origin(hint)
    if hint is Any:
        return []
    if hint is type(None) or hint is None:
        return [] if value is None else [f"{where}: {value!r} is not null"]
    if origin is Literal:
        return [] if value in get_args(hint) else [f"{where}: {value!r} not in {get_args(hint)}"]
    if origin in (typing.Union, types.UnionType):
        options = [_problems(value, arm, where) for arm in get_args(hint)]
        return [] if any(not o for o in options) else [f"{where}: {value!r} matches none of {hint}"]
    if isinstance(hint, type) and hasattr(hint, "__annotations__") and issubclass(hint, dict):
        return _typed_dict_problems(value, hint, where)
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: {type(value).__name__} is not an object"]
        key_t, value_t = get_args(hint) or (Any, Any)
        out = []
        for k, v in value.items():
            out += _problems(k, key_t, f"{where} key") + _problems(v, value_t, f"{where}.{k}")
        return out
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: {type(value).__name__} is not a list"]
        (item_t,) = get_args(hint) or (Any,)
        return [p for i, v in enumerate(value) for p in _problems(v, item_t, f"{where}[{i}]")]
    if hint is int:
        return [] if isinstance(value, int) and not isinstance(value, bool) else [f"{where}: {value!r} is not an int"]
    if isinstance(hint, type):
        return [] if isinstance(value, hint) else [f"{where}: {value!r} is not {hint.__name__}"]
    raise AssertionError(f"{where}: the checker does not know {hint!r}")


def _typed_dict_problems(value: Any, td: type, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: {type(value).__name__} is not an object"]
    fields, required = _fields(td)
    out = [f"{where}: missing {k!r}" for k in sorted(required - value.keys())]
    out += [f"{where}: undeclared {k!r}" for k in sorted(value.keys() - fields.keys())]
    for key in value.keys() & fields.keys():
        out += _problems(value[key], fields[key], f"{where}.{key}")
    return out


def test_the_checker_catches_what_it_should() -> None:
    good = {"type": "progress", "version": 3, "round": 1, "phase": "choice", "done": 1, "of": 3}
    assert _typed_dict_problems(good, events.ProgressEvent, "p") == []
    assert _typed_dict_problems({**good, "extra": 1}, events.ProgressEvent, "p") == ["p: undeclared 'extra'"]
    assert _typed_dict_problems({k: v for k, v in good.items() if k != "of"}, events.ProgressEvent, "p") == ["p: missing 'of'"]
    assert _typed_dict_problems({**good, "done": "1"}, events.ProgressEvent, "p")
    assert _typed_dict_problems({**good, "done": True}, events.ProgressEvent, "p")
    assert _typed_dict_problems({**good, "type": "state"}, events.ProgressEvent, "p")
    assert _typed_dict_problems({"type": "ack", "ref": None, "action": "ping"}, events.AckEvent, "a") == []
    assert _typed_dict_problems({"type": "ack", "ref": 5, "action": "ping"}, events.AckEvent, "a")
    belief = {"type": "belief.submit", "round": 1, "beliefs": {"A": {"guess": "maybe", "confidence": 70}}}
    assert _typed_dict_problems(belief, events.BeliefSubmitMsg, "b")


def _check_server_frame(frame: dict[str, Any]) -> None:
    declared = events.SERVER_EVENTS.get(frame.get("type"))
    assert declared is not None, f"undeclared server message type: {frame}"
    problems = _typed_dict_problems(frame, declared, frame["type"])
    assert not problems, (problems, frame)
    if frame["type"] == "state":
        present = SECTIONS & frame.keys()
        assert present == {SECTION_OF_STAGE.get(frame["stage"], "end")}, (frame["stage"], present)


# ---- every frame of a whole game ----------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
async def test_every_frame_of_a_game_matches_its_declaration() -> None:
    @db
    def arrive() -> tuple[Any, list[str], str]:
        experiment = gamekit.experiment_small(n_rounds=1, belief_rounds="last", show_public_tally=True)
        session = factories.session_create(experiment, capacity=10)
        people = [services.participant_join(session_id=session.pk, prolific_pid=f"E{i}") for i in range(4)]
        return session, [p.token for p in people], factories.quiz_answers(experiment)

    _, tokens, quiz = await arrive()
    seats = [await Seat(t).connect() for t in tokens]
    decliner, players = seats[0], seats[1:]
    assert (await decliner.send({"type": "consent", "accept": False, "ref": "no"}))["type"] == "ack"
    await decliner.until(lambda s: s["stage"] == "declined")
    for seat in players:
        # Like a page, wait for each stage's state before answering it: broadcasts are sent after commit,
        # asynchronously, and a client that races ahead may see only the newest state (by design).
        assert (await seat.send({"type": "consent", "accept": True}))["type"] == "ack"
        await seat.until(lambda s: s["stage"] == "instructions")
        assert (await seat.send({"type": "instructions.done"}))["type"] == "ack"
        await seat.until(lambda s: s["stage"] == "quiz")
        assert (await seat.send({"type": "quiz.submit", "answers": {"0": "4"}}))["result"]["correct"] is False
        assert (await seat.send({"type": "quiz.submit", "answers": quiz, "ref": "q"}))["result"]["correct"] is True
        # Not in a game yet (or, for the last arrival, not the choice phase): an error frame.
        assert (await seat.send({"type": "choice.submit", "round": 1, "candidate": "A", "amount": 1}))["type"] == "error"
    for seat in players:
        await seat.until(lambda s: s["stage"] == "playing")
    by_role = {s.state["me"]["seat"]: s for s in players}
    group = await db(lambda: Participant.objects.select_related("group").get(token=tokens[1]).group)()
    human = next(s for seat, s in by_role.items() if not seat.startswith("S"))
    me = human.state["me"]["seat"]
    assert (await human.send({"type": "pitch.submit", "round": 1, "text": "<b>hi</b>"}))["type"] == "ack"
    await human.send({"type": "pitch.submit", "round": 1, "text": "again"})  # an error frame
    await db(gamekit.bots_act)(group)
    for seat in ("S1", "S2"):
        s = by_role[seat]
        await s.until(s.in_phase(1, "choice"))
        assert (await s.send({"type": "choice.submit", "round": 1, "candidate": me, "amount": 4}))["type"] == "ack"
    await human.until(human.in_phase(1, "return"))
    for t in human.state["game"]["to_return"]:
        assert (await human.send({"type": "return.submit", "round": 1, "selector": t["selector"], "amount": 6}))["type"] == "ack"
    await human.until(human.in_phase(1, "feedback"))
    await db(gamekit.deadline_pass)(group)
    for seat in ("S1", "S2"):
        s = by_role[seat]
        state = await s.until(s.in_phase(1, "belief"))
        beliefs = {c["seat"]: {"guess": "human", "confidence": 55} for c in state["game"]["candidates"]}
        assert (await s.send({"type": "belief.submit", "round": 1, "beliefs": beliefs}))["type"] == "ack"
    for seat in players:
        await seat.until(lambda s: s["stage"] == "questionnaire")
        assert (await seat.send({"type": "questionnaire.submit", "answers": ANSWERS}))["type"] == "ack"
        await seat.until(lambda s: s["stage"] == "finished")
        assert (await seat.send({"type": "ping", "ref": "bye"}))["type"] == "ack"
    frames = [frame for seat in seats for frame in seat.log]
    for seat in seats:
        await seat.close()
    assert {f["type"] for f in frames} == {"state", "progress", "ack", "error"}
    stages = {f["stage"] for f in frames if f["type"] == "state"}
    assert stages >= {"consent", "instructions", "quiz", "lobby", "playing", "questionnaire", "finished", "declined"}
    phases = {f["game"]["phase"] for f in frames if f["type"] == "state" and "game" in f}
    assert phases == {"pitch", "choice", "return", "feedback", "belief"}
    for frame in frames:
        _check_server_frame(frame)


@pytest.mark.django_db
def test_an_end_state_after_a_lobby_timeout_matches_its_declaration() -> None:
    from datetime import timedelta

    from django.utils import timezone

    from experiment.selectors import seat_state

    session = factories.session_create(gamekit.experiment_small(lobby_timeout_seconds=5), capacity=10)
    [pid] = factories.people_onboard(session, 1)
    _check_server_frame(seat_state(pid))
    services.sweep(now=timezone.now() + timedelta(seconds=10))
    state = seat_state(pid)
    assert state["stage"] == "lobby_timeout"
    _check_server_frame(state)


# ---- every client message type is accepted --------------------------------------------------------------------

@pytest.mark.django_db
def test_every_client_message_type_is_accepted_by_dispatch() -> None:
    experiment = gamekit.experiment_small(n_rounds=1, belief_rounds="last")
    session = factories.session_create(experiment, capacity=10)
    accepted: dict[str, dict[str, Any]] = {}

    def send(participant_id: int, message: dict[str, Any]) -> dict[str, Any]:
        problems = _typed_dict_problems(message, events.CLIENT_MESSAGES[message["type"]], message["type"])
        assert not problems, problems  # the example is exactly the declared shape
        ack = actions.dispatch(participant_id, message)
        assert ack["type"] == "ack" and ack["action"] == message["type"] and ack["ref"] == message.get("ref")
        assert not _typed_dict_problems(ack, events.AckEvent, "ack"), ack
        accepted[message["type"]] = message
        return ack

    people = [services.participant_join(session_id=session.pk) for _ in range(3)]
    for p in people:
        send(p.pk, {"type": "ping", "ref": "r1"})
        send(p.pk, {"type": "consent", "accept": True})
        send(p.pk, {"type": "instructions.done"})
        ack = send(p.pk, {"type": "quiz.submit", "answers": factories.quiz_answers(experiment), "ref": "quiz"})
        assert ack["result"] == {"correct": True, "wrong": []}
    group = Participant.objects.get(pk=people[0].pk).group
    seats = gamekit.seats(group)
    human = next(p for p in seats.values() if p.role == "candidate" and p.kind == "human")
    send(human.pk, {"type": "pitch.submit", "round": 1, "text": "hello"})
    gamekit.bots_act(group)
    for s in ("S1", "S2"):
        send(seats[s].pk, {"type": "choice.submit", "round": 1, "candidate": human.seat, "amount": 3})
    send(human.pk, {"type": "return.submit", "round": 1, "selector": "S1", "amount": 9})
    send(human.pk, {"type": "return.submit", "round": 1, "selector": "S2", "amount": 0})
    gamekit.deadline_pass(group)  # feedback
    for s in ("S1", "S2"):
        send(seats[s].pk, {"type": "belief.submit", "round": 1,
                           "beliefs": {c: {"guess": "bot", "confidence": 77} for c in ("A", "B")}})
    for p in people:
        send(p.pk, {"type": "questionnaire.submit", "answers": ANSWERS})
    assert set(accepted) == set(events.CLIENT_MESSAGES)
