"""Phase deadlines: every phase closes by its deadline with the recorded defaults (``timed_out``),
K consecutive timeouts drop a participant (and, if the experiment says so, a bot takes the seat and
plays on), a group nobody is watching still finishes, the sweep closes phases whose job was lost,
and the lobby clock (timeout, synthetic fill) runs from the sweep."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from experiment import game, services
from experiment.game import RuleError
from experiment.models import Belief, Choice, Event, Group, Message, Participant, Return, RoundPayoff
from experiment.scheduling import runner
from experiment.selectors import seat_state
from tests import factories
from tests.experiment import gamekit
from tests.wsclient import Seat

pytestmark = [pytest.mark.django_db(transaction=True)]
executor_connections_closed = gamekit.executor_connections_closed
P = Participant


def _human_candidate(group: Group) -> Participant:
    return gamekit.people(group, P.Role.CANDIDATE)[0]


def _bot_candidate(group: Group) -> Participant:
    return Participant.objects.get(group=group, role=P.Role.CANDIDATE, kind=P.Kind.BOT)


def _defaults_logged(group: Group, round_number: int, phase: str) -> set[str]:
    return set(Event.objects.filter(group=group, type="default.applied", round_number=round_number, phase=phase)
               .values_list("participant__seat", flat=True))


def _choose(group: Group, picks: dict[str, tuple[str, int]]) -> None:
    r = gamekit.fresh(group).round_number
    seats = gamekit.seats(group)
    for selector, (candidate, amount) in picks.items():
        services.choice_submit(participant_id=seats[selector].pk, round_number=r, candidate=candidate, amount=amount)


# ---- each phase ---------------------------------------------------------------------------------------------

def test_pitch_timeout_stores_an_empty_message() -> None:
    group = gamekit.group_start(dropout_after=10)
    human = _human_candidate(group)
    services.pitch_submit(participant_id=human.pk, round_number=1, text="I wrote in time")
    group = gamekit.deadline_pass(group)
    assert (group.round_number, group.phase) == (1, "choice")
    bot = _bot_candidate(group)
    rows = {m.candidate_id: m for m in Message.objects.filter(group=group, round_number=1)}
    assert (rows[human.pk].text, rows[human.pk].timed_out) == ("I wrote in time", False)
    assert (rows[bot.pk].text, rows[bot.pk].timed_out) == ("", True)
    assert _defaults_logged(group, 1, "pitch") == {bot.seat}
    closed = Event.objects.get(group=group, type="phase.closed", round_number=1, phase="pitch")
    assert closed.payload["timed_out_seats"] == [bot.seat]
    assert Participant.objects.get(pk=bot.pk).consecutive_timeouts == 1
    assert Participant.objects.get(pk=human.pk).consecutive_timeouts == 0


def test_choice_timeout_picks_the_recorded_random_candidate_and_sends_nothing() -> None:
    group = gamekit.group_start(dropout_after=10)
    gamekit.pitch_all(group)
    human = _human_candidate(group)
    _choose(group, {"S1": (human.seat, 5)})
    group = gamekit.deadline_pass(group)
    s2 = Choice.objects.get(group=group, round_number=1, selector__seat="S2")
    expected = game.default_choice(group.seed, "S2", 1, ["A", "B"], group.session.experiment.params())
    assert expected in ("A", "B")
    assert (s2.candidate.seat, s2.sent, s2.multiplied, s2.timed_out, s2.decision_seconds) == (expected, 0, 0, True, None)
    assert s2.order[s2.position - 1] == expected
    s1 = Choice.objects.get(group=group, round_number=1, selector__seat="S1")
    assert (s1.candidate_id, s1.sent, s1.timed_out) == (human.pk, 5, False)
    assert _defaults_logged(group, 1, "choice") == {"S2"}
    assert group.phase == "return"


def test_choice_timeout_without_a_choice_when_configured() -> None:
    group = gamekit.group_start(dropout_after=10, choice_timeout="none")
    gamekit.pitch_all(group)
    group = gamekit.deadline_pass(group)
    choices = Choice.objects.filter(group=group, round_number=1)
    assert sorted((c.selector.seat, c.candidate_id, c.sent, c.timed_out, c.position) for c in choices) == [
        ("S1", None, 0, True, None), ("S2", None, 0, True, None)]
    # Nobody owes a return: the return phase closes at once and the round is settled.
    assert group.phase == "feedback"
    assert not Return.objects.filter(choice__group=group).exists()
    points = dict(RoundPayoff.objects.filter(participant__group=group, round_number=1).values_list("participant__seat", "points"))
    assert points == {"S1": 10, "S2": 10, "A": 0, "B": 0}


def test_return_timeout_returns_nothing() -> None:
    group = gamekit.group_start(dropout_after=10)
    gamekit.pitch_all(group)
    human, bot = _human_candidate(group), _bot_candidate(group)
    _choose(group, {"S1": (human.seat, 5), "S2": (bot.seat, 3)})
    assert gamekit.at(group) == (1, "return")
    group = gamekit.deadline_pass(group)
    returns = {r.choice.selector.seat: r for r in Return.objects.filter(choice__group=group)}
    assert {s: (r.available, r.returned, r.timed_out) for s, r in returns.items()} == {"S1": (15, 0, True), "S2": (9, 0, True)}
    assert _defaults_logged(group, 1, "return") == {human.seat, bot.seat}
    points = dict(RoundPayoff.objects.filter(participant__group=group, round_number=1).values_list("participant__seat", "points"))
    assert points == {"S1": 5, "S2": 7, human.seat: 15, bot.seat: 9}
    assert group.phase == "feedback"


def test_feedback_ends_at_its_deadline_without_defaults() -> None:
    group = gamekit.group_start(dropout_after=10, choice_timeout="none")
    gamekit.pitch_all(group)
    group = gamekit.deadline_pass(group)
    assert group.phase == "feedback"
    before = Event.objects.filter(type="default.applied").count()
    group = gamekit.deadline_pass(group)
    assert (group.round_number, group.phase) == (2, "pitch")
    assert Event.objects.filter(type="default.applied").count() == before


def test_belief_timeout_stores_empty_guesses() -> None:
    group = gamekit.group_start(dropout_after=10, n_rounds=1, belief_rounds="last", choice_timeout="none")
    gamekit.pitch_all(group)
    group = gamekit.deadline_pass(group)  # choice → (return skipped) → feedback
    group = gamekit.deadline_pass(group)  # feedback → belief
    assert (group.round_number, group.phase) == (1, "belief")
    s1 = gamekit.seats(group)["S1"]
    services.belief_submit(participant_id=s1.pk, round_number=1,
                           beliefs={"A": {"guess": "bot", "confidence": 90}, "B": {"guess": "human", "confidence": 60}})
    group = gamekit.deadline_pass(group)
    rows = Belief.objects.filter(group=group, round_number=1)
    assert sorted((b.selector.seat, b.candidate.seat, b.guess, b.confidence, b.timed_out) for b in rows) == [
        ("S1", "A", "bot", 90, False), ("S1", "B", "human", 60, False),
        ("S2", "A", "", None, True), ("S2", "B", "", None, True)]
    assert _defaults_logged(group, 1, "belief") == {"S2"}
    assert group.status == Group.Status.FINISHED
    assert set(Participant.objects.filter(group=group, controller=P.Controller.PERSON).values_list("status", flat=True)) == {
        "questionnaire"}


# ---- dropouts ---------------------------------------------------------------------------------------------

def test_k_consecutive_timeouts_drop_a_participant_and_defaults_continue() -> None:
    group = gamekit.group_start(dropout_after=2, n_rounds=3, belief_rounds="", choice_timeout="none")
    s1, s2 = gamekit.seats(group)["S1"], gamekit.seats(group)["S2"]
    for r in (1, 2):
        gamekit.pitch_all(group)
        if r == 2:  # S2 acts in round 2: its count starts again, S1 keeps missing
            _choose(group, {"S2": (_human_candidate(group).seat, 0)})
        group = gamekit.deadline_pass(group)  # choice
        s1.refresh_from_db()
        assert s1.consecutive_timeouts == r
        assert s1.status == ("playing" if r == 1 else "dropped")
        if gamekit.at(group)[1] == "return":
            group = gamekit.deadline_pass(group)
        group = gamekit.deadline_pass(group)  # feedback
    s2.refresh_from_db()
    assert (s2.status, s2.consecutive_timeouts) == ("playing", 0)
    dropped = Event.objects.filter(group=group, type="participant.dropped")
    assert [(e.participant_id, e.round_number, e.phase, e.payload["consecutive_timeouts"]) for e in dropped] == [
        (s1.pk, 2, "choice", 2)]
    assert not Event.objects.filter(type="seat.takeover").exists()
    assert Participant.objects.get(pk=s1.pk).controller == P.Controller.PERSON
    # Round 3: nobody waits for S1, its default is recorded as soon as the choice phase opens.
    gamekit.pitch_all(group)
    assert gamekit.at(group) == (3, "choice")
    default = Choice.objects.get(selector=s1, round_number=3)
    assert default.timed_out and default.sent == 0
    # The person cannot come back into the game; their page shows the dropout code.
    with pytest.raises(RuleError) as info:
        services.choice_submit(participant_id=s1.pk, round_number=3, candidate="A", amount=1)
    assert info.value.code == "dropped"
    state = seat_state(s1.pk)
    assert state["stage"] == "dropped"
    assert state["end"]["completion_code"] == group.session.experiment.dropout_code


def test_with_policy_bot_a_scripted_bot_takes_the_seat_and_plays() -> None:
    group = gamekit.group_start(dropout_after=2, n_rounds=3, belief_rounds="", dropout_policy="bot")
    human = _human_candidate(group)
    runner.clear()
    # Round 1: the human candidate misses the pitch, both selectors choose them, they miss the return.
    gamekit.bots_act(group)
    group = gamekit.deadline_pass(group)
    _choose(group, {"S1": (human.seat, 4), "S2": (human.seat, 2)})
    assert gamekit.at(group) == (1, "return")
    group = gamekit.deadline_pass(group)
    human.refresh_from_db()
    assert human.status == P.Status.DROPPED
    assert human.controller == P.Controller.SCRIPTED
    assert human.kind == P.Kind.HUMAN  # the seat stays a human seat by design; who plays it is recorded
    takeover = Event.objects.get(type="seat.takeover", participant=human)
    assert takeover.payload == {"controller": "scripted"}
    assert Event.objects.filter(type="participant.dropped", participant=human, id__lt=takeover.id).exists()
    # The person's own page shows the dropout code and their actions are refused.
    assert seat_state(human.pk)["stage"] == "dropped"
    group = gamekit.deadline_pass(group)  # feedback → round 2 pitch
    assert gamekit.at(group) == (2, "pitch")
    with pytest.raises(RuleError) as info:
        services.pitch_submit(participant_id=human.pk, round_number=2, text="I am back")
    assert info.value.code == "seat_taken_over"
    # The bot now acts in the seat through the scheduled job, like any automated seat.
    assert gamekit.run_seat_jobs() >= 2  # the original bot and the new one
    mine = Message.objects.get(candidate=human, round_number=2)
    assert mine.text and not mine.timed_out
    assert gamekit.at(group) == (2, "choice")
    _choose(group, {"S1": (human.seat, 6), "S2": (human.seat, 0)})
    assert gamekit.at(group) == (2, "return")
    gamekit.run_seat_jobs()
    ret = Return.objects.get(choice__round_number=2, choice__selector__seat="S1")
    assert ret.candidate_id == human.pk and not ret.timed_out and 0 <= ret.returned <= 18
    assert gamekit.at(group) == (2, "feedback")


# ---- nobody watching ----------------------------------------------------------------------------------------

async def test_a_group_whose_humans_all_vanish_still_finishes(scheduler) -> None:
    @gamekit.db
    def start() -> Group:
        # Everyone went through the lobby, then closed their browser: no websocket is open at all.
        return gamekit.group_start(n_rounds=2, belief_rounds="last", **factories.FAST)

    group = await start()

    @gamekit.db
    def status() -> str:
        return gamekit.fresh(group).status

    started = time.monotonic()
    while await status() != Group.Status.FINISHED:
        assert time.monotonic() - started < 90, "the group stalled"
        await asyncio.sleep(0.5)

    @gamekit.db
    def check() -> None:
        seats = gamekit.seats(group)
        for r in (1, 2):
            assert Message.objects.filter(group=group, round_number=r).count() == 2
            assert Choice.objects.filter(group=group, round_number=r).count() == 2
            assert RoundPayoff.objects.filter(participant__group=group, round_number=r).count() == 4
        assert Belief.objects.filter(group=group, round_number=2).count() == 4
        bot = _bot_candidate(group)
        # The bot played (at least once: under heavy load a bot may miss a 2 s phase); the humans got
        # defaults and were dropped after two misses.
        assert Message.objects.filter(candidate=bot, timed_out=False).exists()
        for p in seats.values():
            if p.controller == P.Controller.PERSON:
                assert p.status == P.Status.DROPPED, p.seat
        assert Event.objects.filter(group=group, type="group.finished").count() == 1
        phases = list(Event.objects.filter(group=group, type="phase.started").values_list("round_number", "phase"))
        assert phases == [(1, "pitch"), (1, "choice"), (1, "return"), (1, "feedback"),
                          (2, "pitch"), (2, "choice"), (2, "return"), (2, "feedback"), (2, "belief")]
        for p in seats.values():
            assert p.payoff == sum(RoundPayoff.objects.filter(participant=p).values_list("points", flat=True))

    await check()


# ---- the sweep ------------------------------------------------------------------------------------------------

def test_the_sweep_closes_an_overdue_phase_whose_job_was_lost() -> None:
    group = gamekit.group_start(dropout_after=10)
    runner.clear()  # the phase_close job is gone (say, the process restarted)
    assert services.sweep() == 0  # not due yet: nothing happens
    assert gamekit.at(group) == (1, "pitch")
    Group.objects.filter(pk=group.pk).update(phase_deadline=timezone.now() - timedelta(seconds=30))
    assert services.sweep() == 1
    assert gamekit.at(group) == (1, "choice")
    assert Message.objects.filter(group=group, round_number=1, timed_out=True).count() == 2
    # Late or repeated jobs for the closed phase change nothing.
    assert services.sweep() == 0
    assert not services.phase_close(group_id=group.pk, round_number=1, phase="pitch", reason="deadline")
    assert Event.objects.filter(group=group, type="phase.closed").count() == 1
    assert Message.objects.filter(group=group).count() == 2


# ---- lobby ----------------------------------------------------------------------------------------------------

def test_lobby_timeout_sends_the_participant_away_with_its_own_code() -> None:
    experiment = gamekit.experiment_small(lobby_timeout_seconds=60)
    session = factories.session_create(experiment, capacity=10)
    [pid] = factories.people_onboard(session, 1)
    assert seat_state(pid)["lobby"]["missing"] == 2
    services.sweep(now=timezone.now() + timedelta(seconds=30))
    assert Participant.objects.get(pk=pid).status == P.Status.LOBBY
    services.sweep(now=timezone.now() + timedelta(seconds=61))
    p = Participant.objects.get(pk=pid)
    assert p.status == P.Status.LOBBY_TIMEOUT and p.group_id is None
    state = seat_state(pid)
    assert state["stage"] == "lobby_timeout"
    assert state["end"]["reason"] == "lobby_timeout"
    assert state["end"]["completion_code"] == experiment.lobby_timeout_code != experiment.completion_code
    assert Event.objects.filter(type="lobby.timeout", participant_id=pid).count() == 1
    # People arriving later do not form a group with someone who has gone.
    factories.people_onboard(session, 2)
    assert not Group.objects.filter(session=session).exists()


def test_synthetic_fill_forms_a_group_after_the_configured_wait() -> None:
    experiment = gamekit.experiment_small()
    session = factories.session_create(experiment, capacity=10, synthetic_fill_after=30)
    [pid] = factories.people_onboard(session, 1)
    services.sweep(now=timezone.now() + timedelta(seconds=10))
    assert Participant.objects.get(pk=pid).status == P.Status.LOBBY
    services.sweep(now=timezone.now() + timedelta(seconds=31))
    me = Participant.objects.get(pk=pid)
    assert me.status == P.Status.PLAYING and me.group_id is not None
    group = me.group
    seats = gamekit.seats(group)
    assert sorted((p.kind, p.controller) for p in seats.values()) == sorted(
        [("human", "person"), ("human", "synthetic"), ("human", "synthetic"), ("bot", "scripted")])
    formed = Event.objects.get(type="group.formed", group=group)
    assert formed.payload["synthetic_humans"] == 2
    # Synthetic humans count neither against the capacity nor as people waiting.
    assert Participant.objects.filter(session=session, controller=P.Controller.PERSON).count() == 1
    # They play: every automated candidate writes its pitch through the scheduled jobs.
    gamekit.run_seat_jobs()
    automated = [p for p in seats.values() if p.role == P.Role.CANDIDATE and p.controller != P.Controller.PERSON]
    for p in automated:
        m = Message.objects.get(candidate=p, round_number=1)
        assert m.text and not m.timed_out


async def test_a_person_whose_seat_a_bot_took_over_still_sees_their_dropout_page() -> None:
    @gamekit.db
    def taken_over() -> tuple[Participant, str, str]:
        group = gamekit.group_start(dropout_after=1, dropout_policy="bot")
        human = _human_candidate(group)
        gamekit.deadline_pass(group)  # misses the pitch: dropped at once (K = 1), a bot takes the seat
        human.refresh_from_db()
        assert (human.status, human.controller) == (P.Status.DROPPED, P.Controller.SCRIPTED)
        synthetic = Participant.objects.create(session=group.session, controller=P.Controller.SYNTHETIC)
        return human, group.session.experiment.dropout_code, synthetic.token

    human, dropout_code, synthetic_token = await taken_over()
    seat = await Seat(human.token).connect()
    assert seat.state["stage"] == "dropped"
    assert seat.state["end"]["completion_code"] == dropout_code
    reply = await seat.send({"type": "pitch.submit", "round": 2, "text": "let me back in"})
    assert (reply["type"], reply["code"]) == ("error", "seat_taken_over")
    await seat.close()
    # Synthetic humans are played by the server: nobody can connect as one.
    refused = Seat(synthetic_token)
    connected, code = await refused.comm.connect()
    assert not connected and code == 4404
    await refused.comm.disconnect()  # let the refused consumer finish inside this test's event loop


def test_decisions_record_who_made_them_after_a_takeover() -> None:
    """A bot that took over a person's seat decides as 'scripted'; the analysis leaves those choices out."""
    from experiment.analysis import counted_choices
    from experiment.export import Scope

    # Long phases: only this test's deadline_pass closes them, however slow the machine is.
    long = {f"{phase}_seconds": 600 for phase in ("pitch", "choice", "return", "feedback", "belief")}
    group = gamekit.group_start(dropout_after=1, dropout_policy="bot", **long)
    selector = gamekit.people(group, Participant.Role.SELECTOR)[0]
    gamekit.pitch_all(group)
    assert gamekit.at(group) == (1, "choice")
    human_message = Message.objects.get(candidate=gamekit.people(group, Participant.Role.CANDIDATE)[0], round_number=1)
    assert human_message.decided_by == "person" and human_message.decision_seconds is not None
    gamekit.bots_act(group)
    gamekit.deadline_pass(group)  # nobody chose: the people time out and (K=1) are taken over
    selector.refresh_from_db()
    assert selector.controller == "scripted"
    defaulted = Choice.objects.get(selector=selector, round_number=1)
    assert defaulted.timed_out and defaulted.decided_by == ""
    for _ in range(10):  # to round 2's choice: the bots act, or the deadline closes what nobody does
        if gamekit.at(group) == (2, "choice"):
            break
        gamekit.bots_act(group)
        if gamekit.at(group) == (2, "choice"):
            break
        gamekit.deadline_pass(group)
    assert gamekit.at(group) == (2, "choice")
    gamekit.bots_act(group)
    by_bot = Choice.objects.get(selector=selector, round_number=2)
    assert by_bot.decided_by == "scripted" and not by_bot.timed_out
    counted = counted_choices(scope=Scope.for_sessions([group.session_id]), include_timeouts=True)
    assert not counted.filter(pk=by_bot.pk).exists()
    assert counted.filter(pk=defaulted.pk).exists()
