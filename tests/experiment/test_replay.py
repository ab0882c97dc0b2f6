"""manage.py replay: a finished session re-run from its seed, frozen design and recorded inputs, compared with
what is stored. Each source of input gets a session of its own, played on a clock that moves as a live one
does (deadlines pass by time, not by editing them), then replayed; a tampered row and a later design edit too."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from datetime import timedelta
from unittest import mock

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.utils import timezone

from bots.models import BotProfile
from experiment import export, replay, services
from experiment.models import Choice, Experiment, Group, Message, Participant, Session
from tests import factories
from tests.experiment import gamekit, playthrough

pytestmark = pytest.mark.django_db
P = Participant


class Clock:
    """The server's clock for a test: it moves only when the test says."""

    def __init__(self) -> None:
        self.now = timezone.now()

    def __call__(self):
        return self.now

    def tick(self, seconds: float = 0.7) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Iterator[Clock]:
    c = Clock()
    with mock.patch("django.utils.timezone.now", c):
        yield c


def join(session: Session, clock: Clock, pid: str, *, quiz_wrong_first: bool = False) -> Participant:
    p = services.participant_join(session_id=session.pk, prolific_pid=pid, study_id="ST", recruitment_session_id="SE" + pid)
    clock.tick()
    services.consent_submit(participant_id=p.pk, accept=True)
    clock.tick()
    services.instructions_done(participant_id=p.pk)
    clock.tick()
    if quiz_wrong_first:
        services.quiz_submit(participant_id=p.pk, answers={"0": "not the answer"})
        clock.tick()
    services.quiz_submit(participant_id=p.pk, answers=factories.quiz_answers(session.experiment))
    clock.tick()
    return Participant.objects.get(pk=p.pk)


def group_join(session: Session, clock: Clock, prefix: str) -> Group:
    """Three people join one after the other: the group they form (the small design seats three people)."""
    people = [join(session, clock, f"{prefix}{i}") for i in range(3)]
    return Participant.objects.get(pk=people[0].pk).group


def expire(group: Group, clock: Clock) -> None:
    """Let the current phase run out of time: the clock passes its deadline and the sweep runs."""
    g = gamekit.fresh(group)
    clock.now = g.phase_deadline + timedelta(seconds=0.4)
    services.sweep(now=clock.now)


def candidates_of(group: Group) -> list[str]:
    return sorted(p.seat for p in gamekit.seats(group).values() if p.role == P.Role.CANDIDATE)


def seat_of(group: Group, role: str, index: int = 0) -> str:
    """The seat of the ``index``-th person of ``role`` in the group (seat names are the game's)."""
    return gamekit.people(group, role)[index].seat


def play(group: Group, clock: Clock, *, silent: frozenset[str] = frozenset(), stop: tuple[int, str] | None = None,
         endowment: int = 10) -> None:
    """Play the group to its end on the clock: people act (except the ``silent`` seats, who time out), then the
    bots; a phase still open runs out of time."""
    while True:
        g = gamekit.fresh(group)
        if g.status != Group.Status.PLAYING or (g.round_number, g.phase) == stop:
            return
        r, phase = g.round_number, g.phase
        for i, p in enumerate(gamekit.people(group)):
            if p.seat in silent or p.status != P.Status.PLAYING or p.controller != P.Controller.PERSON:
                continue
            clock.tick()
            if phase == "pitch" and p.role == P.Role.CANDIDATE:
                services.pitch_submit(participant_id=p.pk, round_number=r, text=f"r{r} {p.seat}: <b>trust</b> me ✓")
            elif phase == "choice" and p.role == P.Role.SELECTOR:
                seats = candidates_of(group)
                services.choice_submit(participant_id=p.pk, round_number=r, candidate=seats[(i + r) % len(seats)],
                                       amount=(3 * i + r) % (endowment + 1))
            elif phase == "return" and p.role == P.Role.CANDIDATE:
                for c in Choice.objects.filter(group=group, round_number=r, candidate=p).select_related("selector"):
                    services.return_submit(participant_id=p.pk, round_number=r, selector=c.selector.seat,
                                           amount=c.multiplied // 3)
            elif phase == "belief" and p.role == P.Role.SELECTOR:
                candidates = candidates_of(group)
                services.belief_submit(participant_id=p.pk, round_number=r, beliefs={
                    s: {"guess": "bot" if (i + j) % 2 else "human", "confidence": 60 + 5 * j}
                    for j, s in enumerate(candidates)})
        clock.tick()
        gamekit.bots_act(group)
        g = gamekit.fresh(group)
        if g.status == Group.Status.PLAYING and (g.round_number, g.phase) == (r, phase):
            expire(group, clock)


def finish(session: Session, clock: Clock) -> None:
    for p in Participant.objects.filter(session=session, status=P.Status.QUESTIONNAIRE).order_by("pk"):
        clock.tick()
        services.questionnaire_submit(participant_id=p.pk, answers=playthrough.ANSWERS | {"comments": f"p{p.pk} ok"})


def replayed(session: Session) -> replay.Result:
    result = replay.replay(session.pk)
    assert result.refused == []
    assert [str(d) for d in result.differences] == []
    assert result.inputs > 0 and result.identical
    return result


def experiment(**fields) -> Experiment:
    return gamekit.experiment_small(**{"n_rounds": 3, "belief_rounds": "1,2,3", **fields})


# ---- one session per source of input ---------------------------------------------------------------------

def test_a_session_played_through_the_services_replays_identically() -> None:
    session = playthrough.session_played()  # declined consent, a person left in the lobby, both arms
    result = replayed(session)
    assert result.groups == 2 and result.rows["choices"] == 18 and result.rows["questionnaire"] == 10


def test_consent_quiz_retries_pitches_choices_returns_beliefs_and_questionnaire(clock: Clock) -> None:
    session = factories.session_create(experiment(), capacity=10)
    declined = services.participant_join(session_id=session.pk, prolific_pid="NO1")
    clock.tick()
    services.consent_submit(participant_id=declined.pk, accept=False)
    people = [join(session, clock, f"P{i}", quiz_wrong_first=i == 1) for i in range(3)]
    group = Participant.objects.get(pk=people[0].pk).group
    play(group, clock)
    finish(session, clock)
    result = replayed(session)
    assert result.rows["beliefs"] == 2 * 2 * 3 and result.rows["questionnaire"] == 3


def test_timeouts_defaults_and_a_dropout_are_rederived_from_the_recorded_times(clock: Clock) -> None:
    session = factories.session_create(experiment(dropout_after=2), capacity=10)
    people = [join(session, clock, f"T{i}") for i in range(3)]
    group = Participant.objects.get(pk=people[0].pk).group
    play(group, clock, silent=frozenset({"S1"}))  # S1 never acts: defaults, then dropped after 2 timeouts
    finish(session, clock)
    assert Participant.objects.filter(group=group, seat="S1", status=P.Status.DROPPED).exists()
    assert Choice.objects.filter(group=group, timed_out=True).count() == 3
    replayed(session)


def test_a_bot_taking_over_a_dropped_seat_replays(clock: Clock) -> None:
    session = factories.session_create(experiment(dropout_after=1, dropout_policy="bot"), capacity=10)
    people = [join(session, clock, f"B{i}") for i in range(3)]
    group = Participant.objects.get(pk=people[0].pk).group
    candidate = seat_of(group, P.Role.CANDIDATE)
    play(group, clock, silent=frozenset({candidate}))
    finish(session, clock)
    assert Participant.objects.get(group=group, seat=candidate).controller == P.Controller.SCRIPTED
    replayed(session)


def test_lobby_timeout_and_synthetic_fill_replay(clock: Clock) -> None:
    session = factories.session_create(experiment(lobby_timeout_seconds=30), capacity=10, synthetic_fill_after=10)
    first = join(session, clock, "L0")
    clock.tick(11)
    services.sweep(now=clock.now)  # the lobby's clock seats L0 with synthetic humans
    group = Participant.objects.get(pk=first.pk).group
    assert group is not None and Participant.objects.filter(group=group, controller=P.Controller.SYNTHETIC).exists()
    play(group, clock)
    finish(session, clock)
    Session.objects.filter(pk=session.pk).update(synthetic_fill_after=None)
    session.refresh_from_db()
    late = join(session, clock, "L1")
    clock.tick(31)
    services.sweep(now=clock.now)
    assert Participant.objects.get(pk=late.pk).status == P.Status.LOBBY_TIMEOUT
    Session.objects.filter(pk=session.pk).update(synthetic_fill_after=10)  # as it was: the replay reads the session
    replayed(session)


def test_the_experimenters_cockpit_actions_replay(clock: Clock) -> None:
    staff = get_user_model().objects.create_user("lab", is_staff=True)
    session = factories.session_create(experiment(n_rounds=4), capacity=20)
    people = [join(session, clock, f"X{i}") for i in range(3)]
    group = Participant.objects.get(pk=people[0].pk).group
    services.session_status_set(session_id=session.pk, status="paused", actor_id=staff.pk)
    clock.tick()
    play(group, clock, stop=(1, "choice"))
    clock.tick()
    services.group_pause(group_id=group.pk, actor_id=staff.pk)
    clock.tick(30)
    services.group_resume(group_id=group.pk, actor_id=staff.pk)
    clock.tick()
    services.group_phase_close_now(group_id=group.pk, actor_id=staff.pk)
    play(group, clock, stop=(2, "pitch"))
    seats = gamekit.seats(group)
    clock.tick()
    services.participant_remove(participant_id=seats[seat_of(group, P.Role.CANDIDATE)].pk, actor_id=staff.pk, replace_with_bot=True)
    play(group, clock, stop=(3, "choice"))
    clock.tick()
    services.participant_remove(participant_id=seats["S2"].pk, actor_id=staff.pk, replace_with_bot=False)
    services.session_status_set(session_id=session.pk, status="open", actor_id=staff.pk)
    waiting = join(session, clock, "X9")
    play(group, clock, stop=(4, "pitch"))
    clock.tick()
    services.session_end(session_id=session.pk, actor_id=staff.pk)  # plays out round 4 by defaults
    assert Participant.objects.get(pk=waiting.pk).status == P.Status.FINISHED
    finish(session, clock)
    replayed(session)


# ---- what the replay must notice, and must not change ------------------------------------------------------

def test_an_edited_choice_row_makes_check_fail_and_names_the_row(clock: Clock) -> None:
    session = factories.session_create(experiment(), capacity=10)
    group = group_join(session, clock, "E")
    play(group, clock)
    finish(session, clock)
    replayed(session)
    choice = Choice.objects.filter(group=group, timed_out=False, round_number=2, selector__seat="S1").get()
    Choice.objects.filter(pk=choice.pk).update(sent=choice.sent + 1, multiplied=(choice.sent + 1) * 3)
    out = io.StringIO()
    with pytest.raises(CommandError) as failed:
        call_command("replay", str(session.pk), "--check", stdout=out)
    assert failed.value.returncode == 1
    assert re.search(rf"differs: choices: row \d+ \(group_number 1, round 2, selector_seat S1, candidate_seat "
                     rf"{choice.candidate.seat}\), column sent: stored {choice.sent + 1}, replayed {choice.sent}\n",
                     out.getvalue()), out.getvalue()


def test_an_edited_pitch_or_a_deleted_event_is_found(clock: Clock) -> None:
    session = factories.session_create(experiment(), capacity=10)
    group = group_join(session, clock, "M")
    play(group, clock)
    finish(session, clock)
    from experiment.models import Event

    Event.objects.filter(session=session, type="round.settled", round_number=2).delete()
    result = replay.replay(session.pk)
    assert not result.identical
    assert any(d.table == "events" and "group 1" in d.where for d in result.differences)


def test_a_design_edit_after_the_start_does_not_change_the_replay_and_the_replay_changes_nothing(clock: Clock) -> None:
    profile = BotProfile.objects.create(name="replayed profile", requires_key=True, api_key_env="NO_SUCH_KEY_SET")
    exp = experiment()
    exp.conditions.update(bot_profile=profile)
    session = factories.session_create(exp, capacity=10)
    group = group_join(session, clock, "D")
    play(group, clock)
    finish(session, clock)
    # After the start: the rules, the arms and the bot profile change (as through the shell or the API).
    Experiment.objects.filter(pk=exp.pk).update(multiplier=5, endowment=20, n_rounds=7, dropout_after=1)
    exp.conditions.update(disclose_identity=True)
    BotProfile.objects.filter(pk=profile.pk).update(model="another-model", temperature=0.1)
    factories.Condition.objects.create(experiment=exp, name="added-later")
    before = gamekit.fingerprint(session), list(Experiment.objects.filter(pk=exp.pk).values()), \
        list(BotProfile.objects.filter(pk=profile.pk).values()), list(Message.objects.values_list("pk", "text"))
    replayed(session)
    after = gamekit.fingerprint(session), list(Experiment.objects.filter(pk=exp.pk).values()), \
        list(BotProfile.objects.filter(pk=profile.pk).values()), list(Message.objects.values_list("pk", "text"))
    assert before == after
    assert Experiment.objects.get(pk=exp.pk).multiplier == 5


def test_replay_refuses_a_running_session_and_an_unknown_one(clock: Clock) -> None:
    session = factories.session_create(experiment(), capacity=10)
    group = group_join(session, clock, "R")
    play(group, clock, stop=(2, "choice"))
    with pytest.raises(CommandError, match="still has groups playing"):
        call_command("replay", str(session.pk), "--check")
    with pytest.raises(CommandError, match="No session with id 999999"):
        call_command("replay", "999999")
    with pytest.raises(CommandError, match="no frozen design"):
        call_command("replay", str(factories.session_create(experiment()).pk))


# ---- the bundle against the database -----------------------------------------------------------------------

def test_check_verifies_a_bundle_against_the_database(clock: Clock, tmp_path) -> None:
    session = factories.session_create(experiment(), capacity=10)
    group = group_join(session, clock, "Z")
    play(group, clock)
    finish(session, clock)
    path = tmp_path / "bundle.zip"
    digests: dict[str, str] = {}
    with open(path, "wb") as out:
        export.bundle_write(scope=export.Scope.session(session.pk), options=export.Options(), out=out, digests=digests)
    out = io.StringIO()
    call_command("replay", str(session.pk), "--check", "--bundle", str(path), "--manifest-sha256",
                 digests[export.MANIFEST], stdout=out)
    assert "intact, and equal to what the database exports" in out.getvalue()
    # A row edited in the database after the export: the bundle no longer matches it, nor does the replay.
    Message.objects.filter(group=group, round_number=1, timed_out=False).update(text="rewritten")
    out = io.StringIO()
    with pytest.raises(CommandError):
        call_command("replay", str(session.pk), "--check", "--json", "--bundle", str(path), stdout=out)
    report = json.loads(out.getvalue())
    assert any(line.startswith("messages.csv differs from what the database exports now")
               for line in report["bundle_problems"])
