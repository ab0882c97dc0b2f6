"""Reconnecting in every stage and phase resumes exactly where the group is.

For each seat a *watcher* connection stays open and builds its state by applying the events it
receives (``experiment.events.apply_event``, as the browser does). The seat under test acts, drops
its connection, the others act, and the seat reconnects: the fresh snapshot must equal the watcher's
state (everything except ``server_time``), for every seat, and show what the seat had submitted."""

from __future__ import annotations

from typing import Any

import pytest

from experiment import services
from experiment.models import Group, Participant
from tests import factories
from tests.experiment import gamekit
from tests.wsclient import Seat

pytestmark = [pytest.mark.django_db(transaction=True)]
executor_connections_closed = gamekit.executor_connections_closed
P = Participant
db = gamekit.db

# 3 selectors and 3 candidates (2 human, 1 bot): every phase has someone acting after the seat under test.
COMPOSITION = {"n_selectors": 3, "n_candidates": 3, "n_bot_candidates": 1, "n_bot_selectors": 0}
ANSWERS = {"age": 30, "gender": "female", "ai_attitude": 5, "suspected_bots": "not sure", "comments": ""}


def _strip(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k != "server_time"}


@db
def _start(**fields: Any) -> tuple[Group, dict[str, Participant]]:
    group = gamekit.group_start(gamekit.experiment_small(**{**COMPOSITION, "n_rounds": 2, "belief_rounds": "1",
                                                           "dropout_after": 100, **fields}))
    return group, gamekit.seats(group)


async def _watch(group: Group) -> dict[str, Seat]:
    people = await db(gamekit.people)(group)
    return {p.seat: await Seat(p.token).connect() for p in people}


async def _act_and_leave(token: str, message: dict[str, Any]) -> dict[str, Any]:
    """Connect, act, see one's own state refreshed, and drop the connection."""
    seat = await Seat(token).connect()
    version = seat.state.get("version", 0)
    reply = await seat.send(message)
    assert reply["type"] == "ack", reply
    await seat.until(lambda s: s["version"] > version or s["stage"] != "playing")
    await seat.close()
    return seat.state


async def _all_resume(watchers: dict[str, Seat], tokens: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Reconnect every seat; each fresh snapshot equals what its watcher built from events."""
    fresh: dict[str, dict[str, Any]] = {}
    for seat, watcher in watchers.items():
        back = await Seat(tokens[seat]).connect()
        want = _strip(back.state)
        try:
            await watcher.until(lambda s, want=want: _strip(s) == want, timeout=10)
        except AssertionError:
            assert _strip(watcher.state) == want, f"seat {seat}: events and snapshot disagree"
        fresh[seat] = back.state
        await back.close()
    return fresh


async def _close(watchers: dict[str, Seat]) -> None:
    for w in watchers.values():
        await w.close()


def _tokens(seats: dict[str, Participant]) -> dict[str, str]:
    return {s: p.token for s, p in seats.items() if p.controller == P.Controller.PERSON}


def _humans(seats: dict[str, Participant]) -> list[Participant]:
    return sorted((p for p in seats.values() if p.role == P.Role.CANDIDATE and p.kind == P.Kind.HUMAN), key=lambda p: p.seat)


def _bot(seats: dict[str, Participant]) -> Participant:
    return next(p for p in seats.values() if p.kind == P.Kind.BOT)


# ---- game phases ---------------------------------------------------------------------------------------------

async def test_reconnect_in_the_pitch_phase() -> None:
    group, seats = await _start()
    tokens, (me, other) = _tokens(seats), _humans(seats)
    watchers = await _watch(group)
    await _act_and_leave(me.token, {"type": "pitch.submit", "round": 1, "text": "mine, kept"})
    await db(gamekit.bots_act)(group)  # someone else acts in the same phase
    fresh = await _all_resume(watchers, tokens)
    assert fresh[me.seat]["game"]["phase"] == "pitch"
    assert fresh[me.seat]["game"]["my_message"] == {"text": "mine, kept", "timed_out": False}
    assert fresh[me.seat]["game"]["progress"] == {"done": 2, "of": 3}
    # The last pitch moves the group on while the seat is away.
    await _act_and_leave(other.token, {"type": "pitch.submit", "round": 1, "text": "other"})
    fresh = await _all_resume(watchers, tokens)
    assert fresh["S1"]["game"]["phase"] == "choice"
    assert {c["seat"]: c["message"] for c in fresh["S1"]["game"]["candidates"]}[me.seat] == "mine, kept"
    await _close(watchers)


async def test_reconnect_in_the_choice_phase() -> None:
    group, seats = await _start()
    await db(gamekit.pitch_all)(group)
    tokens, (human, _) = _tokens(seats), _humans(seats)
    watchers = await _watch(group)
    await _act_and_leave(seats["S1"].token, {"type": "choice.submit", "round": 1, "candidate": human.seat, "amount": 7})
    await db(services.choice_submit)(participant_id=seats["S2"].pk, round_number=1, candidate=human.seat, amount=2)
    fresh = await _all_resume(watchers, tokens)
    assert fresh["S1"]["game"]["my_choice"] == {"candidate": human.seat, "sent": 7, "timed_out": False}
    assert fresh["S1"]["game"]["todo"] is False and fresh["S3"]["game"]["todo"] is True
    assert fresh["S3"]["game"]["progress"] == {"done": 2, "of": 3}
    await db(services.choice_submit)(participant_id=seats["S3"].pk, round_number=1, candidate=_bot(seats).seat, amount=1)
    fresh = await _all_resume(watchers, tokens)
    assert fresh["S1"]["game"]["phase"] == "return"
    assert fresh["S1"]["game"]["my_choice"]["sent"] == 7
    await _close(watchers)


async def test_reconnect_in_the_return_phase() -> None:
    group, seats = await _start()
    await db(gamekit.pitch_all)(group)
    tokens, (me, _) = _tokens(seats), _humans(seats)
    bot = _bot(seats)

    @db
    def choose() -> None:
        for s, c, amount in (("S1", me, 4), ("S2", me, 5), ("S3", bot, 6)):
            services.choice_submit(participant_id=seats[s].pk, round_number=1, candidate=c.seat, amount=amount)

    await choose()
    watchers = await _watch(group)
    await _act_and_leave(me.token, {"type": "return.submit", "round": 1, "selector": "S1", "amount": 12})
    await db(gamekit.bots_act)(group)  # the bot returns to S3
    fresh = await _all_resume(watchers, tokens)
    mine = fresh[me.seat]["game"]
    assert mine["phase"] == "return" and mine["todo"] is True
    assert mine["to_return"] == [
        {"selector": "S1", "name": "Selector 1", "sent": 4, "multiplied": 12, "returned": 12},
        {"selector": "S2", "name": "Selector 2", "sent": 5, "multiplied": 15, "returned": None}]
    assert mine["progress"] == {"done": 2, "of": 3}
    await _act_and_leave(me.token, {"type": "return.submit", "round": 1, "selector": "S2", "amount": 0})
    fresh = await _all_resume(watchers, tokens)
    assert fresh[me.seat]["game"]["phase"] == "feedback"
    assert fresh[me.seat]["game"]["feedback"]["earned"] == 0 + 15
    assert fresh["S1"]["game"]["feedback"]["payoff"] == 10 - 4 + 12
    await _close(watchers)


async def test_reconnect_in_the_feedback_phase() -> None:
    group, seats = await _start(choice_timeout="none")
    await db(gamekit.pitch_all)(group)
    await db(gamekit.deadline_pass)(group)  # nobody chose: straight to feedback
    assert await db(gamekit.at)(group) == (1, "feedback")
    tokens = _tokens(seats)
    watchers = await _watch(group)
    leaving = await Seat(tokens["S2"]).connect()
    await leaving.close()
    await db(gamekit.deadline_pass)(group)  # the phase ends while S2 is away
    fresh = await _all_resume(watchers, tokens)
    assert fresh["S2"]["game"]["phase"] == "belief"
    assert fresh["S2"]["game"]["my_choice"] == {"candidate": None, "sent": 0, "timed_out": True}
    await _close(watchers)


async def test_reconnect_in_the_belief_phase() -> None:
    group, seats = await _start(choice_timeout="none")
    await db(gamekit.pitch_all)(group)
    await db(gamekit.deadline_pass)(group)
    await db(gamekit.deadline_pass)(group)
    assert await db(gamekit.at)(group) == (1, "belief")
    tokens = _tokens(seats)
    guesses = {c: {"guess": "bot" if c == _bot(seats).seat else "human", "confidence": 80} for c in ("A", "B", "C")}
    watchers = await _watch(group)
    await _act_and_leave(tokens["S1"], {"type": "belief.submit", "round": 1, "beliefs": guesses})
    await db(services.belief_submit)(participant_id=seats["S2"].pk, round_number=1,
                                     beliefs={c: {"guess": "human", "confidence": 50} for c in ("A", "B", "C")})
    fresh = await _all_resume(watchers, tokens)
    assert fresh["S1"]["game"]["beliefs"] == guesses
    assert fresh["S1"]["game"]["todo"] is False and fresh["S3"]["game"]["todo"] is True
    await _close(watchers)


# ---- before and after the game -------------------------------------------------------------------------------

async def test_reconnect_in_the_lobby_and_when_the_group_forms() -> None:
    @db
    def arrive() -> tuple[Any, list[Participant]]:
        session = factories.session_create(gamekit.experiment_small(), capacity=10)
        return session, [services.participant_join(session_id=session.pk) for _ in range(3)]

    session, people = await arrive()
    answers = factories.quiz_answers(session.experiment)

    async def onboard(p: Participant) -> None:
        seat = await Seat(p.token).connect()
        for message in ({"type": "consent", "accept": True}, {"type": "instructions.done"}):
            assert (await seat.send(message))["type"] == "ack"
        await seat.until(lambda s: s["stage"] == "quiz")
        wrong = await seat.send({"type": "quiz.submit", "answers": {"0": "4"}})
        assert wrong["type"] == "ack" and wrong["result"]["correct"] is False
        assert (await seat.send({"type": "quiz.submit", "answers": answers}))["result"]["correct"] is True
        await seat.until(lambda s: s["stage"] in ("lobby", "playing"))  # the last arrival goes straight to the game
        await seat.close()

    await onboard(people[0])
    tokens = {str(i): p.token for i, p in enumerate(people)}
    watchers = {"0": await Seat(tokens["0"]).connect()}
    await onboard(people[1])  # someone else arrives while the first person is away
    fresh = await _all_resume(watchers, {"0": tokens["0"]})
    assert fresh["0"]["stage"] == "lobby"
    assert fresh["0"]["lobby"]["waiting"] == 2 and fresh["0"]["lobby"]["missing"] == 1
    watchers["1"] = await Seat(tokens["1"]).connect()
    await onboard(people[2])  # the group forms
    fresh = await _all_resume(watchers, {"0": tokens["0"], "1": tokens["1"]})
    assert fresh["0"]["stage"] == fresh["1"]["stage"] == "playing"
    assert fresh["0"]["game"]["phase"] == "pitch"
    await _close(watchers)


async def test_reconnect_before_the_lobby_keeps_the_quiz_attempts() -> None:
    @db
    def arrive() -> Participant:
        session = factories.session_create(gamekit.experiment_small(), capacity=10)
        return services.participant_join(session_id=session.pk)

    p = await arrive()
    watchers = {"me": await Seat(p.token).connect()}
    await _act_and_leave(p.token, {"type": "consent", "accept": True})
    await _act_and_leave(p.token, {"type": "instructions.done"})
    await _act_and_leave(p.token, {"type": "quiz.submit", "answers": {"0": "7"}})
    fresh = await _all_resume(watchers, {"me": p.token})
    assert fresh["me"]["stage"] == "quiz" and fresh["me"]["quiz"]["attempts"] == 1
    await _close(watchers)


async def test_reconnect_in_the_questionnaire_and_after_it() -> None:
    group, seats = await _start(n_rounds=1, belief_rounds="", choice_timeout="none")
    await db(gamekit.pitch_all)(group)
    await db(gamekit.deadline_pass)(group)  # choice → feedback
    await db(gamekit.deadline_pass)(group)  # feedback → end of game
    tokens = _tokens(seats)
    watchers = await _watch(group)
    assert {w.state["stage"] for w in watchers.values()} == {"questionnaire"}
    await _act_and_leave(tokens["S1"], {"type": "questionnaire.submit", "answers": ANSWERS})
    await db(services.questionnaire_submit)(participant_id=seats["S2"].pk, answers=ANSWERS)
    fresh = await _all_resume(watchers, tokens)
    assert fresh["S1"]["stage"] == fresh["S2"]["stage"] == "finished"
    code = await db(lambda: Group.objects.get(pk=group.pk).session.experiment.completion_code)()
    assert fresh["S1"]["end"]["completion_code"] == code
    assert fresh["S3"]["stage"] == "questionnaire"
    await _close(watchers)
