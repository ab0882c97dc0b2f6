"""A whole game over real websockets: 3 selectors, 2 human candidates, 2 scripted bot candidates,
3 rounds, in each condition. Every stored choice, return and payoff is checked."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from experiment import services
from experiment.models import Belief, Choice, Group, Message, Participant, Return, RoundPayoff
from tests import factories
from tests.wsclient import Seat

pytestmark = [pytest.mark.django_db(transaction=True)]

ROUNDS = 3


@database_sync_to_async
def _setup(disclose: bool):
    experiment = factories.experiment_create(conditions=((("disclosed" if disclose else "hidden"), disclose),),
                                             n_rounds=ROUNDS, belief_rounds="last", **factories.FAST)
    session = factories.session_create(experiment, capacity=5)
    people = [services.participant_join(session_id=session.pk, prolific_pid=f"PID{i}") for i in range(5)]
    return experiment, session, [p.token for p in people]


async def _onboard(seat: Seat, answers: dict[str, str]) -> None:
    assert seat.state["stage"] == "consent"
    assert (await seat.send({"type": "consent", "accept": True}))["type"] == "ack"
    assert (await seat.send({"type": "instructions.done"}))["type"] == "ack"
    reply = await seat.send({"type": "quiz.submit", "answers": answers})
    assert reply["result"]["correct"] is True


@pytest.mark.parametrize("disclose", [False, True], ids=["hidden", "disclosed"])
async def test_whole_game(disclose: bool, scheduler) -> None:
    experiment, session, tokens = await _setup(disclose)
    seats = [await Seat(t).connect() for t in tokens]
    answers = factories.quiz_answers(experiment)
    for seat in seats:
        await _onboard(seat, answers)
    for seat in seats:
        await seat.until(lambda s: s["stage"] == "playing")
    selectors = [s for s in seats if s.state["me"]["role"] == "selector"]
    candidates = [s for s in seats if s.state["me"]["role"] == "candidate"]
    assert len(selectors) == 3 and len(candidates) == 2

    expected_sent: dict[tuple[str, int], tuple[str, int]] = {}
    for r in range(1, ROUNDS + 1):
        for c in candidates:
            await c.until(c.in_phase(r, "pitch"))
            reply = await c.send({"type": "pitch.submit", "round": r, "text": f"<b>round {r}</b> from {c.state['me']['seat']}"})
            assert reply["type"] == "ack", reply
        for i, s in enumerate(selectors):
            state = await s.until(s.in_phase(r, "choice"), timeout=20)
            listed = state["game"]["candidates"]
            labels = {card["label"] for card in listed}
            assert labels == ({"Human", "AI bot"} if disclose else {""})
            # Each selector picks by position so that human and bot candidates both get chosen.
            target = listed[(i + r) % len(listed)]["seat"]
            amount = (i + r) % 11
            reply = await s.send({"type": "choice.submit", "round": r, "candidate": target, "amount": amount})
            assert reply["type"] == "ack", reply
            expected_sent[(s.state["me"]["seat"], r)] = (target, amount)
        for c in candidates:
            state = await c.until(lambda st, r=r: (st.get("game", {}).get("round") == r
                                  and st["game"]["phase"] in ("return", "feedback", "belief"))
                                  or st["stage"] != "playing", timeout=20)
            if state["game"]["phase"] == "return":
                for t in state["game"]["to_return"]:
                    reply = await c.send({"type": "return.submit", "round": r, "selector": t["selector"],
                                          "amount": t["multiplied"] // 2})
                    assert reply["type"] == "ack", reply
    for s in selectors:
        state = await s.until(s.in_phase(ROUNDS, "belief"), timeout=20)
        beliefs = {card["seat"]: {"guess": "bot", "confidence": 70} for card in state["game"]["candidates"]}
        assert (await s.send({"type": "belief.submit", "round": ROUNDS, "beliefs": beliefs}))["type"] == "ack"
    for seat in seats:
        await seat.until(lambda st: st["stage"] == "questionnaire", timeout=20)
    answers_q = {"age": 30, "gender": "female", "ai_attitude": 5, "suspected_bots": "yes", "comments": ""}
    for seat in seats:
        assert (await seat.send({"type": "questionnaire.submit", "answers": answers_q}))["type"] == "ack"
        end = await seat.until(lambda st: st["stage"] == "finished")
        assert end["end"]["completion_code"] == experiment.completion_code
    for seat in seats:
        await seat.close()

    @database_sync_to_async
    def check() -> None:
        group = Group.objects.get(session=session)
        assert group.status == Group.Status.FINISHED
        assert group.condition.disclose_identity is disclose
        seat_of = {p.seat: p for p in group.participants.all()}
        assert sum(p.kind == "bot" for p in seat_of.values()) == 2
        assert Message.objects.filter(group=group).count() == 4 * ROUNDS
        # Human messages are stored as the plain text that was typed (markup and all).
        assert Message.objects.filter(group=group, text__startswith="<b>round 1</b>").count() == 2
        choices = Choice.objects.filter(group=group)
        assert choices.count() == 3 * ROUNDS
        for c in choices:
            target, amount = expected_sent[(c.selector.seat, c.round_number)]
            assert (c.candidate.seat, c.sent, c.multiplied, c.timed_out) == (target, amount, 3 * amount, False)
            assert c.label_shown == (("AI bot" if c.candidate.kind == "bot" else "Human") if disclose else "")
            assert c.order[c.position - 1] == target
        returns = Return.objects.filter(choice__group=group)
        assert returns.count() == 3 * ROUNDS
        for ret in returns:
            assert ret.available == ret.choice.multiplied
            if ret.candidate.kind == "human":
                assert ret.returned == ret.available // 2 and not ret.timed_out
            else:
                assert 0 <= ret.returned <= ret.available
        for p in seat_of.values():
            per_round = {rp.round_number: rp.points for rp in RoundPayoff.objects.filter(participant=p)}
            assert set(per_round) == set(range(1, ROUNDS + 1))
            for r, points in per_round.items():
                if p.role == "selector":
                    c = choices.get(selector=p, round_number=r)
                    assert points == 10 - c.sent + c.return_decision.returned
                else:
                    got = [ch for ch in choices.filter(round_number=r, candidate=p)]
                    assert points == sum(ch.multiplied - ch.return_decision.returned for ch in got)
            assert p.payoff == sum(per_round.values())
        assert Belief.objects.filter(group=group, round_number=ROUNDS, timed_out=False).count() == 12
        assert Participant.objects.filter(session=session, status="finished").count() == 7

    await check()
