"""A whole game over real websockets on the embedded default, with language-model bots (through the real
openai client and the fake server): 2 human + 1 LLM selectors, 2 human + 2 LLM candidates, 3 rounds.
The in-process scheduler runs deadlines and releases; the models are awaited on the bots' event loop."""

from __future__ import annotations

from datetime import timedelta

import pytest
from channels.db import database_sync_to_async

from bots.decisions import background
from bots.fake_openai import DEFAULT_PITCH, FakeOpenAI
from bots.models import BotDecision, BotProfile, LLMCall
from bots.selectors import llm_spend
from experiment import replay, services
from experiment.models import Belief, Choice, Event, Group, Message, Participant, Return
from tests import factories
from tests.bots.conftest import experiment_with
from tests.wsclient import Seat

pytestmark = [pytest.mark.django_db(transaction=True)]
P = Participant
ROUNDS = 3
PHASES = {"pitch_seconds": 8, "choice_seconds": 8, "return_seconds": 8, "feedback_seconds": 1, "belief_seconds": 8}


@database_sync_to_async
def _setup(profile: BotProfile) -> tuple:
    experiment = experiment_with(profile, n_selectors=3, n_bot_selectors=1, n_candidates=4, n_bot_candidates=2,
                                 n_rounds=ROUNDS, belief_rounds="last", **PHASES)
    session = factories.session_create(experiment, capacity=4)
    people = [services.participant_join(session_id=session.pk) for _ in range(4)]
    return experiment, session, [p.token for p in people]


async def test_a_whole_game_with_language_model_bots(fake: FakeOpenAI, profile: BotProfile, scheduler) -> None:
    fake.latency = 0.2
    experiment, session, tokens = await _setup(profile)
    seats = [await Seat(t).connect() for t in tokens]
    for seat in seats:
        await seat.send({"type": "consent", "accept": True})
        await seat.send({"type": "instructions.done"})
        await seat.send({"type": "quiz.submit", "answers": factories.quiz_answers(experiment)})
    for seat in seats:
        await seat.until(lambda s: s["stage"] == "playing")
    selectors = [s for s in seats if s.state["me"]["role"] == "selector"]
    candidates = [s for s in seats if s.state["me"]["role"] == "candidate"]
    assert len(selectors) == 2 and len(candidates) == 2

    for r in range(1, ROUNDS + 1):
        for c in candidates:
            await c.until(c.in_phase(r, "pitch"), timeout=20)
            assert (await c.send({"type": "pitch.submit", "round": r, "text": f"human pitch {r}"}))["type"] == "ack"
        for i, s in enumerate(selectors):
            state = await s.until(s.in_phase(r, "choice"), timeout=30)
            cards = state["game"]["candidates"]
            # By the choice phase the bots' pitches are in, written by the model.
            bot_cards = [c for c in cards if c["label"] == "AI bot"]
            assert len(bot_cards) == 2 and all(c["message"] == DEFAULT_PITCH for c in bot_cards)
            target = bot_cards[(i + r) % 2]["seat"] if i == 0 else cards[r % len(cards)]["seat"]
            assert (await s.send({"type": "choice.submit", "round": r, "candidate": target, "amount": 6}))["type"] == "ack"
        for c in candidates:
            state = await c.until(lambda st, r=r: st.get("game", {}).get("round") == r
                                  and st["game"]["phase"] in ("return", "feedback", "belief"), timeout=30)
            if state["game"]["phase"] == "return":
                for t in state["game"]["to_return"]:
                    await c.send({"type": "return.submit", "round": r, "selector": t["selector"], "amount": 0})
    for s in selectors:
        state = await s.until(s.in_phase(ROUNDS, "belief"), timeout=30)
        beliefs = {card["seat"]: {"guess": "bot", "confidence": 70} for card in state["game"]["candidates"]}
        assert (await s.send({"type": "belief.submit", "round": ROUNDS, "beliefs": beliefs}))["type"] == "ack"
    for seat in seats:
        await seat.until(lambda st: st["stage"] == "questionnaire", timeout=30)
        await seat.close()
    assert background.wait_idle(10)

    @database_sync_to_async
    def check() -> None:
        group = Group.objects.get(session=session)
        assert group.status == Group.Status.FINISHED
        bots = list(group.participants.filter(kind=P.Kind.BOT))
        assert len(bots) == 3 and all(b.controller == P.Controller.LLM for b in bots)
        bot_candidates = [b for b in bots if b.role == P.Role.CANDIDATE]
        bot_selector = next(b for b in bots if b.role == P.Role.SELECTOR)
        # Every bot pitch was written by the model and released after a human-like delay.
        for m in Message.objects.filter(candidate__in=bot_candidates):
            assert (m.text, m.timed_out) == (DEFAULT_PITCH, False)
        assert Message.objects.filter(candidate__in=bot_candidates).count() == 2 * ROUNDS
        for e in Event.objects.filter(participant__in=bots, type__in=["pitch.submitted", "choice.submitted"]):
            assert e.payload.get("seconds") is None or e.payload["seconds"] >= profile.delay_min - 0.05, e.payload
        # The model's returns: the middle of the allowed range (what the fake answers).
        returns = Return.objects.filter(candidate__in=bot_candidates)
        assert returns.count() == Choice.objects.filter(group=group, candidate__in=bot_candidates).count() >= ROUNDS
        for ret in returns:
            assert (ret.returned, ret.timed_out) == ((ret.available + 1) // 2, False)
        # The bot selector chose (first candidate it was shown, the middle amount) and guessed every round's end.
        for c in Choice.objects.filter(selector=bot_selector):
            assert (c.position, c.sent, c.timed_out) == (1, 5, False)
        assert Belief.objects.filter(selector=bot_selector, round_number=ROUNDS, timed_out=False).count() == 4
        # Every call recorded, valid and applied; the decisions all came from the model.
        calls = LLMCall.objects.filter(session=session)
        # One call per bot candidate per return phase, however many selectors chose it.
        return_turns = Choice.objects.filter(group=group, candidate__in=bot_candidates).values("candidate", "round_number")
        n_decisions = 2 * ROUNDS + return_turns.order_by().distinct().count() + ROUNDS + 1
        assert calls.count() == n_decisions == len(fake.requests)
        assert set(calls.values_list("status", "applied")) == {("ok", True)}
        assert set(BotDecision.objects.filter(session=session).values_list("status", "source")) == {("applied", "llm")}
        for d in BotDecision.objects.filter(session=session):
            assert d.apply_at >= d.created_at - timedelta(seconds=1)
        spend = llm_spend(session_id=session.pk)
        assert spend["total"]["calls"] == n_decisions
        assert spend["total"]["tokens_in"] == sum(calls.values_list("tokens_in", flat=True)) > 0
        assert spend["total"]["cost"] == sum(calls.values_list("cost", flat=True)) > 0
        assert spend["decisions"] == {"llm": n_decisions, "scripted": 0, "defaulted": 0}
        # The session replays from its log, the model seats from their logged replies (issue 19)...
        result = replay.replay(session.pk)
        assert (result.refused, [str(d) for d in result.differences]) == ([], [])
        assert result.identical
        # ... and a logged reply edited after the game shows in the replay.
        call = calls.filter(phase="choice").first()
        LLMCall.objects.filter(pk=call.pk).update(parsed=[{**call.parsed[0], "amount": 1}])
        changed = replay.replay(session.pk)
        assert any(d.table == "choices" and d.column == "sent" and (d.stored, d.replayed) == (5, 1)
                   for d in changed.differences), [str(d) for d in changed.differences]

    await check()
