"""Bad input over real websockets: every bad message gets a clear ``error`` (with a stable code) and
changes nothing that is stored (row counts, event log, group version, statuses), and the connection
keeps working afterwards."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from experiment import services
from experiment.models import Choice, Group, Message, Participant, Return
from tests import factories
from tests.experiment import gamekit
from tests.wsclient import Seat

pytestmark = [pytest.mark.django_db(transaction=True)]
executor_connections_closed = gamekit.executor_connections_closed
P = Participant
db = gamekit.db


async def _refused(seat: Seat, message: Any, code: str, session_id: int, *, binary: bool = False) -> dict[str, Any]:
    """Send one bad message; assert the error code and that nothing stored changed."""
    before = await db(gamekit.fingerprint)(await db(_session)(session_id))
    if binary:
        seat.replies.clear()
        await seat.comm.send_to(bytes_data=message)
        reply = await _next_reply(seat)
    elif isinstance(message, str):
        reply = await seat.send_raw(message)
    else:
        reply = await seat.send(message)
    assert reply["type"] == "error", (message if not isinstance(message, str) else message[:80], reply)
    assert reply["code"] == code, (str(message)[:80], reply)
    assert isinstance(reply["message"], str) and reply["message"]
    after = await db(gamekit.fingerprint)(await db(_session)(session_id))
    assert after == before, f"{str(message)[:80]} changed stored state"
    return reply


async def _next_reply(seat: Seat, timeout: float = 10) -> dict[str, Any]:
    while not seat.replies:
        await seat._pump(timeout)
    return seat.replies.pop(0)


async def _alive(seat: Seat) -> None:
    assert (await seat.send({"type": "ping", "ref": "still-there"})) == {"type": "ack", "ref": "still-there", "action": "ping"}


def _session(session_id: int):
    from experiment.models import Session

    return Session.objects.get(pk=session_id)


@db
def _game(**fields: Any) -> tuple[Group, dict[str, Participant]]:
    group = gamekit.group_start(**fields)
    return group, gamekit.seats(group)


@db
def _to_choice(group: Group) -> None:
    gamekit.pitch_all(group)
    assert gamekit.at(group)[1] == "choice"


def _human_candidate(seats: dict[str, Participant]) -> Participant:
    return next(p for p in seats.values() if p.role == P.Role.CANDIDATE and p.controller == P.Controller.PERSON)


def _bot_candidate(seats: dict[str, Participant]) -> Participant:
    return next(p for p in seats.values() if p.role == P.Role.CANDIDATE and p.kind == P.Kind.BOT)


# ---- amounts ---------------------------------------------------------------------------------------------

async def test_amounts_out_of_range_or_not_a_number() -> None:
    group, seats = await _game()
    await _to_choice(group)
    selector = await Seat(seats["S1"].token).connect()
    sid = group.session_id
    target = _human_candidate(seats).seat
    for amount, code in [(-1, "amount_out_of_range"), (-1000, "amount_out_of_range"), (11, "amount_out_of_range"),
                         (10**30, "amount_out_of_range"), ("-3", "amount_out_of_range"),
                         ("abc", "not_a_number"), ("", "not_a_number"), (2.5, "not_a_number"), (None, "not_a_number"),
                         (True, "not_a_number"), ([5], "not_a_number"), ({"n": 5}, "not_a_number"),
                         ("--5", "not_a_number"), ("²", "not_a_number"), ("9" * 5000, "not_a_number")]:
        await _refused(selector, {"type": "choice.submit", "round": 1, "candidate": target, "amount": amount}, code, sid)
    # Missing amount is not a number either.
    await _refused(selector, {"type": "choice.submit", "round": 1, "candidate": target}, "not_a_number", sid)
    # NaN / Infinity are accepted by Python's JSON parser: they must still be refused.
    for literal in ("NaN", "Infinity", "-Infinity"):
        raw = '{"type": "choice.submit", "round": 1, "candidate": "' + target + '", "amount": ' + literal + "}"
        await _refused(selector, raw, "not_a_number", sid)
    await _alive(selector)
    # The same seat can still make its valid choice afterwards.
    assert (await selector.send({"type": "choice.submit", "round": 1, "candidate": target, "amount": 10}))["type"] == "ack"
    await selector.close()


async def test_fixed_send_refuses_other_amounts() -> None:
    group, seats = await _game(send_mode="fixed")
    await _to_choice(group)
    selector = await Seat(seats["S2"].token).connect()
    target = _human_candidate(seats).seat
    for amount in (0, 5, 9):
        await _refused(selector, {"type": "choice.submit", "round": 1, "candidate": target, "amount": amount},
                       "amount_out_of_range", group.session_id)
    await selector.close()


async def test_return_above_the_multiplied_amount_and_for_someone_who_did_not_choose_you() -> None:
    group, seats = await _game()
    await _to_choice(group)
    human, bot = _human_candidate(seats), _bot_candidate(seats)

    @db
    def choose() -> None:
        services.choice_submit(participant_id=seats["S1"].pk, round_number=1, candidate=human.seat, amount=4)
        services.choice_submit(participant_id=seats["S2"].pk, round_number=1, candidate=bot.seat, amount=7)
        assert gamekit.at(group) == (1, "return")

    await choose()
    candidate = await Seat(human.token).connect()
    assert candidate.state["game"]["to_return"] == [
        {"selector": "S1", "name": "Selector 1", "sent": 4, "multiplied": 12, "returned": None}]
    sid = group.session_id
    for amount, code in [(13, "amount_out_of_range"), (1000, "amount_out_of_range"), (-1, "amount_out_of_range"),
                         ("x", "not_a_number"), (1.5, "not_a_number"), (None, "not_a_number")]:
        await _refused(candidate, {"type": "return.submit", "round": 1, "selector": "S1", "amount": amount}, code, sid)
    # S2 chose the bot, not this candidate: no returning on the bot's behalf.
    await _refused(candidate, {"type": "return.submit", "round": 1, "selector": "S2", "amount": 1}, "unknown_selector", sid)
    for selector in ("S9", "", None, 1, ["S1"], {"seat": "S1"}):
        await _refused(candidate, {"type": "return.submit", "round": 1, "selector": selector, "amount": 1},
                       "unknown_selector", sid)
    # Exactly the multiplied amount is fine.
    assert (await candidate.send({"type": "return.submit", "round": 1, "selector": "S1", "amount": 12}))["type"] == "ack"
    # And a second return for the same choice is refused.
    await _refused(candidate, {"type": "return.submit", "round": 1, "selector": "S1", "amount": 0}, "already_submitted", sid)

    @db
    def stored() -> list[tuple[str, int, int]]:
        return list(Return.objects.filter(choice__group=group).values_list("choice__selector__seat", "available", "returned"))

    assert await stored() == [("S1", 12, 12)]
    await candidate.close()


# ---- phases and repeats ----------------------------------------------------------------------------------

async def test_a_choice_in_the_wrong_phase_or_round() -> None:
    group, seats = await _game()
    selector = await Seat(seats["S1"].token).connect()
    target = _human_candidate(seats).seat
    sid = group.session_id
    assert selector.state["game"]["phase"] == "pitch"
    await _refused(selector, {"type": "choice.submit", "round": 1, "candidate": target, "amount": 3}, "wrong_phase", sid)
    await _to_choice(group)
    await selector.until(selector.in_phase(1, "choice"))
    for r in (0, 2, -1, 99):
        await _refused(selector, {"type": "choice.submit", "round": r, "candidate": target, "amount": 3}, "wrong_phase", sid)
    for r in ("1", 1.0, None, True):
        await _refused(selector, {"type": "choice.submit", "round": r, "candidate": target, "amount": 3},
                       "invalid_message", sid)
    # A belief outside a belief phase.
    await _refused(selector, {"type": "belief.submit", "round": 1, "beliefs": {}}, "wrong_phase", sid)
    await selector.close()


async def test_a_second_choice_in_the_same_round() -> None:
    group, seats = await _game()
    await _to_choice(group)
    human, bot = _human_candidate(seats), _bot_candidate(seats)
    selector = await Seat(seats["S1"].token).connect()
    assert (await selector.send({"type": "choice.submit", "round": 1, "candidate": human.seat, "amount": 6}))["type"] == "ack"
    # The phase is still open (S2 has not chosen): a second choice, even a different one, is refused.
    assert await db(gamekit.at)(group) == (1, "choice")
    await _refused(selector, {"type": "choice.submit", "round": 1, "candidate": bot.seat, "amount": 2},
                   "already_submitted", group.session_id)
    await _refused(selector, {"type": "choice.submit", "round": 1, "candidate": human.seat, "amount": 6},
                   "already_submitted", group.session_id)

    @db
    def stored() -> list[tuple[str, int]]:
        return list(Choice.objects.filter(selector=seats["S1"]).values_list("candidate__seat", "sent"))

    assert await stored() == [(human.seat, 6)]
    await selector.until(lambda s: s["game"]["my_choice"] == {"candidate": human.seat, "sent": 6, "timed_out": False})
    await selector.close()


async def test_a_second_pitch_in_the_same_round() -> None:
    group, seats = await _game()
    candidate = await Seat(_human_candidate(seats).token).connect()
    assert (await candidate.send({"type": "pitch.submit", "round": 1, "text": "first"}))["type"] == "ack"
    await _refused(candidate, {"type": "pitch.submit", "round": 1, "text": "second"}, "already_submitted", group.session_id)
    await candidate.until(lambda s: s["game"]["my_message"] == {"text": "first", "timed_out": False})
    await candidate.close()


# ---- other seats and other groups --------------------------------------------------------------------------

async def test_a_candidate_that_is_not_in_the_group() -> None:
    @db
    def two_groups() -> tuple[Group, Group]:
        session = factories.session_create(gamekit.experiment_small(), capacity=50)
        factories.people_onboard(session, 6)
        first, second = Group.objects.filter(session=session).order_by("number")
        gamekit.pitch_all(first)
        return first, second

    first, second = await two_groups()
    seats1, seats2 = await db(gamekit.seats)(first), await db(gamekit.seats)(second)
    selector = await Seat(seats1["S1"].token).connect()
    sid = first.session_id
    foreign = _human_candidate(seats2)
    for candidate in ("Z", "S2", "", None, foreign.pk, str(foreign.pk), foreign.token, ["A"], {"seat": "A"}):
        await _refused(selector, {"type": "choice.submit", "round": 1, "candidate": candidate, "amount": 1},
                       "unknown_candidate", sid)
    # Naming a seat letter always means the candidate of one's own group, whatever else the message claims.
    reply = await selector.send({"type": "choice.submit", "round": 1, "candidate": foreign.seat, "amount": 1,
                                 "group": second.pk, "participant": foreign.pk})
    assert reply["type"] == "ack"

    @db
    def stored() -> tuple[int, int, int]:
        c = Choice.objects.get(selector=seats1["S1"])
        return c.candidate_id, c.group_id, Choice.objects.filter(group=second).count()

    assert await stored() == (seats1[foreign.seat].pk, first.pk, 0)
    await selector.close()


async def test_acting_for_another_seat() -> None:
    group, seats = await _game()
    human, bot = _human_candidate(seats), _bot_candidate(seats)
    me = await Seat(human.token).connect()
    sid = group.session_id
    # Fields that name another seat are ignored: the token decides who acts.
    reply = await me.send({"type": "pitch.submit", "round": 1, "text": "mine", "participant": bot.pk, "seat": bot.seat,
                           "token": bot.token, "candidate": bot.seat})
    assert reply["type"] == "ack"

    @db
    def messages() -> list[tuple[str, str]]:
        return list(Message.objects.filter(group=group).values_list("candidate__seat", "text"))

    assert await messages() == [(human.seat, "mine")]
    # A selector cannot pitch, a candidate cannot choose or believe.
    selector = await Seat(seats["S1"].token).connect()
    await _refused(selector, {"type": "pitch.submit", "round": 1, "text": "let me"}, "wrong_role", sid)
    await _refused(me, {"type": "choice.submit", "round": 1, "candidate": bot.seat, "amount": 1}, "wrong_role", sid)
    await _refused(me, {"type": "belief.submit", "round": 1, "beliefs": {}}, "wrong_role", sid)
    await me.close()
    await selector.close()


async def test_tokens_that_are_not_a_person_seat_are_refused() -> None:
    _, seats = await _game()
    bot = _bot_candidate(seats)
    for token in ("no-such-token", bot.token, "x" * 300):
        seat = Seat(token)
        connected, code = await seat.comm.connect()
        assert not connected, token
        if token and len(token) < 100:
            assert code == 4404, (token, code)
        await seat.comm.disconnect()


async def test_a_foreign_origin_is_rejected() -> None:
    _, seats = await _game()
    for origin in ("http://evil.example", "https://127.0.0.1.evil.example", "null"):
        seat = Seat(seats["S1"].token, origin=origin)
        connected, _ = await seat.comm.connect()
        assert not connected, origin
        await seat.comm.disconnect()
    good = await Seat(seats["S1"].token).connect()  # the same token from the site's own origin works
    assert good.state["stage"] == "playing"
    await good.close()


# ---- messages ---------------------------------------------------------------------------------------------

async def test_a_message_over_the_limit_or_with_nul() -> None:
    group, seats = await _game(message_max_chars=20)
    candidate = await Seat(_human_candidate(seats).token).connect()
    sid = group.session_id
    reply = await _refused(candidate, {"type": "pitch.submit", "round": 1, "text": "x" * 21, "ref": "r1"}, "message_too_long", sid)
    assert reply["ref"] == "r1" and "20" in reply["message"]
    await _refused(candidate, {"type": "pitch.submit", "round": 1, "text": "é" * 21}, "message_too_long", sid)
    await _refused(candidate, {"type": "pitch.submit", "round": 1, "text": "a\u0000b"}, "invalid_text", sid)
    for text in (None, 5, ["hi"], {"t": "hi"}):
        await _refused(candidate, {"type": "pitch.submit", "round": 1, "text": text}, "invalid_message", sid)
    assert (await candidate.send({"type": "pitch.submit", "round": 1, "text": "x" * 20}))["type"] == "ack"
    await candidate.close()


async def test_markup_in_a_message_is_stored_and_sent_as_plain_text() -> None:
    group, seats = await _game()
    human = _human_candidate(seats)
    text = '<script>alert("pwn")</script><img src=x onerror="alert(1)"> & &amp; </textarea>'
    candidate = await Seat(human.token).connect()
    assert (await candidate.send({"type": "pitch.submit", "round": 1, "text": text}))["type"] == "ack"
    await candidate.until(lambda s: s["game"]["my_message"] is not None)
    assert candidate.state["game"]["my_message"] == {"text": text, "timed_out": False}

    @db
    def after() -> str:
        gamekit.bots_act(group)
        return Message.objects.get(candidate=human, round_number=1).text

    assert await after() == text
    selector = await Seat(seats["S1"].token).connect()
    state = await selector.until(selector.in_phase(1, "choice"))
    card = next(c for c in state["game"]["candidates"] if c["seat"] == human.seat)
    assert card["message"] == text
    # The page itself never carries messages: they only arrive in the state JSON (shown with textContent).
    page = await db(lambda: Client().get(f"/play/{seats['S1'].token}/"))()
    assert page.status_code == 200
    assert b"alert" not in page.content and b"<script>alert" not in page.content
    await candidate.close()
    await selector.close()


# Valid JSON whose strings no database can store: a lone UTF-16 surrogate (not encodable as UTF-8) or NUL.
UNSTORABLE = ["\\ud83d broken", "broken \\udc00", "a\\u0000b", "\\ude00\\ud83d"]


async def test_text_no_database_can_store_is_refused_wherever_it_is() -> None:
    """Each in a raw frame, as a client sends it (the escape is valid JSON); the reply is one error, nothing
    is stored, and the connection lives on. Anywhere in the message: the text, the ref, a key, an ignored
    field, the quiz and the questionnaire."""
    group, seats = await _game()
    candidate = await Seat(_human_candidate(seats).token).connect()
    sid = group.session_id
    for bad in UNSTORABLE:
        for raw in (f'{{"type":"pitch.submit","round":1,"text":"{bad}"}}',
                    f'{{"type":"pitch.submit","round":1,"text":"fine","ref":"{bad}"}}',
                    f'{{"type":"pitch.submit","round":1,"text":"fine","{bad}":1}}',
                    f'{{"type":"ping","extra":["ok",{{"deep":"{bad}"}}]}}'):
            reply = await _refused(candidate, raw, "invalid_text", sid)
            assert "\\u" not in reply["message"]
    await _alive(candidate)
    # A surrogate pair is one character (an emoji): stored and shown as sent.
    assert (await candidate.send_raw('{"type":"pitch.submit","round":1,"text":"hi \\ud83d\\ude00"}'))["type"] == "ack"
    assert await db(lambda: list(Message.objects.filter(group=group).values_list("text", flat=True)))() == ["hi \U0001f600"]
    await candidate.close()

    @db
    def at_the_quiz() -> tuple[int, str]:
        session = factories.session_create(gamekit.experiment_small(), capacity=10)
        p = services.participant_join(session_id=session.pk)
        services.consent_submit(participant_id=p.pk, accept=True)
        services.instructions_done(participant_id=p.pk)
        return session.pk, p.token

    sid, token = await at_the_quiz()
    seat = await Seat(token).connect()
    assert seat.state["stage"] == "quiz"
    for bad in UNSTORABLE:
        await _refused(seat, f'{{"type":"quiz.submit","answers":{{"0":"{bad}"}}}}', "invalid_text", sid)
    await _alive(seat)
    await seat.close()


async def test_a_questionnaire_comment_no_database_can_store_is_refused() -> None:
    group, seats = await _game(n_rounds=1, belief_rounds="", choice_timeout="none")

    @db
    def to_questionnaire() -> None:
        gamekit.pitch_all(group)
        gamekit.deadline_pass(group)
        gamekit.deadline_pass(group)

    await to_questionnaire()
    seat = await Seat(seats["S1"].token).connect()
    assert seat.state["stage"] == "questionnaire"
    good = '"age":30,"gender":"female","ai_attitude":5,"suspected_bots":"yes"'
    for bad in UNSTORABLE:
        await _refused(seat, f'{{"type":"questionnaire.submit","answers":{{{good},"comments":"{bad}"}}}}',
                       "invalid_text", group.session_id)
    assert (await seat.send_raw(f'{{"type":"questionnaire.submit","answers":{{{good},"comments":"ok"}}}}'))["type"] == "ack"
    await seat.close()


# ---- frames -----------------------------------------------------------------------------------------------

async def test_frames_that_are_not_a_valid_message() -> None:
    group, seats = await _game()
    seat = await Seat(seats["S1"].token).connect()
    sid = group.session_id
    await _refused(seat, json.dumps({"type": "pitch.submit", "round": 1, "text": "x" * 1_000_000}), "frame_too_large", sid)
    await _refused(seat, "x" * (1 << 20), "frame_too_large", sid)
    assert len("[" * 4000 + "]" * 4000) < 8192  # the nested frames below are within the size limit
    for raw in ("{", "not json", '{"type": "ping"', "{'type': 'ping'}", " ", "[" * 4000 + "]" * 4000,
                '{"a":' * 1300 + "1" + "}" * 1300):
        await _refused(seat, raw, "malformed_json", sid)
    for raw in ("[1, 2]", "3", "null", '"ping"', "true"):
        await _refused(seat, raw, "invalid_message", sid)
    await _refused(seat, b'{"type": "ping"}', "invalid_message", sid, binary=True)
    await _refused(seat, {"type": "nonsense"}, "unknown_type", sid)
    await _refused(seat, {"type": None}, "unknown_type", sid)
    await _refused(seat, {"round": 1}, "unknown_type", sid)
    await _refused(seat, {"type": ["ping"]}, "unknown_type", sid)
    await _refused(seat, {"type": "ping", "ref": "r" * 65}, "invalid_message", sid)
    await _refused(seat, {"type": "ping", "ref": 5}, "invalid_message", sid)
    # Stage actions that are over.
    await _refused(seat, {"type": "consent", "accept": True}, "wrong_stage", sid)
    await _refused(seat, {"type": "questionnaire.submit", "answers": {}}, "wrong_stage", sid)
    await _alive(seat)
    await seat.close()


async def test_bad_pre_game_input() -> None:
    @db
    def joined() -> tuple[int, str]:
        session = factories.session_create(gamekit.experiment_small(), capacity=10)
        p = services.participant_join(session_id=session.pk)
        return session.pk, p.token

    sid, token = await joined()
    seat = await Seat(token).connect()
    assert seat.state["stage"] == "consent"
    for accept in ("yes", 1, None):
        await _refused(seat, {"type": "consent", "accept": accept}, "invalid_message", sid)
    await _refused(seat, {"type": "instructions.done"}, "wrong_stage", sid)
    await _refused(seat, {"type": "choice.submit", "round": 1, "candidate": "A", "amount": 1}, "not_in_group", sid)
    assert (await seat.send({"type": "consent", "accept": True}))["type"] == "ack"
    assert (await seat.send({"type": "instructions.done"}))["type"] == "ack"
    for answers in (None, [], "0"):
        await _refused(seat, {"type": "quiz.submit", "answers": answers}, "invalid_message", sid)
    await seat.close()


async def test_bad_beliefs() -> None:
    group, seats = await _game(n_rounds=1, belief_rounds="last", choice_timeout="none")

    @db
    def to_belief() -> None:
        gamekit.pitch_all(group)
        gamekit.deadline_pass(group)  # choice → feedback (nobody chose)
        gamekit.deadline_pass(group)  # feedback → belief
        assert gamekit.at(group) == (1, "belief")

    await to_belief()
    selector = await Seat(seats["S1"].token).connect()
    sid = group.session_id
    good = {"guess": "bot", "confidence": 70}
    for beliefs, code in [
        ({"A": good}, "incomplete_beliefs"), ({"A": good, "B": good, "C": good}, "incomplete_beliefs"),
        ({"A": good, "Z": good}, "incomplete_beliefs"), (None, "incomplete_beliefs"), ([good, good], "incomplete_beliefs"),
        ({"A": good, "B": {"guess": "alien", "confidence": 70}}, "invalid_belief"),
        ({"A": good, "B": "bot"}, "invalid_belief"), ({"A": good, "B": {"confidence": 70}}, "invalid_belief"),
        ({"A": good, "B": {"guess": "human", "confidence": 49}}, "confidence_out_of_range"),
        ({"A": good, "B": {"guess": "human", "confidence": 101}}, "confidence_out_of_range"),
        ({"A": good, "B": {"guess": "human", "confidence": "high"}}, "not_a_number"),
        ({"A": good, "B": {"guess": "human"}}, "not_a_number"),
    ]:
        await _refused(selector, {"type": "belief.submit", "round": 1, "beliefs": beliefs}, code, sid)
    assert (await selector.send({"type": "belief.submit", "round": 1, "beliefs": {"A": good, "B": good}}))["type"] == "ack"
    await _refused(selector, {"type": "belief.submit", "round": 1, "beliefs": {"A": good, "B": good}}, "already_submitted", sid)
    await selector.close()


async def test_bad_questionnaire_answers() -> None:
    group, seats = await _game(n_rounds=1, belief_rounds="", choice_timeout="none")

    @db
    def to_questionnaire() -> None:
        gamekit.pitch_all(group)
        gamekit.deadline_pass(group)
        gamekit.deadline_pass(group)
        assert gamekit.fresh(group).status == Group.Status.FINISHED

    await to_questionnaire()
    seat = await Seat(seats["S1"].token).connect()
    assert seat.state["stage"] == "questionnaire"
    sid = group.session_id
    good = {"age": 30, "gender": "female", "ai_attitude": 5, "suspected_bots": "yes", "comments": ""}
    for answers in (None, [], {**good, "age": 12}, {**good, "age": "thirty"}, {**good, "age": True},
                    {**good, "gender": "robot"}, {**good, "ai_attitude": 8}, {**good, "comments": "x" * 1001},
                    {k: v for k, v in good.items() if k != "suspected_bots"}):
        code = "invalid_message" if not isinstance(answers, dict) else "invalid_answer"
        await _refused(seat, {"type": "questionnaire.submit", "answers": answers}, code, sid)
    assert (await seat.send({"type": "questionnaire.submit", "answers": good}))["type"] == "ack"
    await _refused(seat, {"type": "questionnaire.submit", "answers": good}, "wrong_stage", sid)
    await seat.close()


async def test_acting_after_the_deadline_before_the_phase_is_closed() -> None:
    group, seats = await _game()
    candidate = await Seat(_human_candidate(seats).token).connect()

    @db
    def overdue() -> None:
        from datetime import timedelta

        from django.utils import timezone

        Group.objects.filter(pk=group.pk).update(phase_deadline=timezone.now() - timedelta(seconds=1))

    await overdue()
    await _refused(candidate, {"type": "pitch.submit", "round": 1, "text": "too late"}, "phase_closed", group.session_id)
    await candidate.close()


def test_questionnaire_rejects_non_ascii_digits() -> None:
    from experiment.game import RuleError
    from experiment.questionnaire import clean_answers

    base = {"age": 30, "gender": "female", "ai_attitude": 5, "suspected_bots": "yes", "comments": ""}
    for bad in ("²", "٣", "3.5", "--3", True, None, "9" * 5000):
        with pytest.raises(RuleError) as err:
            clean_answers({**base, "ai_attitude": bad})
        assert err.value.code == "invalid_answer"
    assert clean_answers({**base, "age": "30"})["age"] == 30
