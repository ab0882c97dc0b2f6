"""Services own every write: validate first, then act under a lock, log an Event, broadcast after commit.

Lock order, everywhere: Session (pre-game stages and grouping) → Group (every game action) → rows.
Humans (through the consumer), automated seats and staff all come through these functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, Exists, F, Max, OuterRef, Q, QuerySet
from django.db.models.functions import Greatest
from django.utils import timezone

from experiment import design, events, game
from experiment.game import Phase, RuleError
from experiment.models import (
    Belief,
    Choice,
    Condition,
    Event,
    Group,
    Message,
    Participant,
    QuestionnaireResponse,
    Return,
    RoundPayoff,
    SeatConnection,
    Session,
    Society,
)
from experiment.scheduling import schedule

logger = logging.getLogger(__name__)

P = Participant
MAX_RECRUITMENT_ID = 64


# ---- helpers ---------------------------------------------------------------------------------------

def _log(*, session_id: int, type: str, group: Group | None = None, participant: Participant | None = None,
         payload: dict[str, Any] | None = None, actor_id: int | None = None) -> Event:
    events.monitor_on_commit(session_id, group.pk if group else None)
    return Event.objects.create(
        session_id=session_id, group=group, participant=participant, type=type, actor_id=actor_id,
        round_number=group.round_number if group else None, phase=group.phase if group else "",
        payload=payload or {},
    )


def _bump(group: Group) -> None:
    group.version += 1
    Group.objects.filter(pk=group.pk).update(version=group.version)


def _lock_session(session_id: int) -> Session:
    return Session.objects.select_for_update().select_related("experiment").get(pk=session_id)


def _groups_locked() -> QuerySet[Group]:
    """Groups read under their row lock, with what the game rules need of them."""
    return Group.objects.select_for_update(of=("self",)).select_related("session__experiment", "condition")


def _lock_group(group_id: int) -> Group:
    return _groups_locked().get(pk=group_id)


def _lock_participant(participant_id: int, *, with_session: bool = True, session_id: int | None = None) -> Participant:
    """Lock the participant's row, and first the whole session's when ``with_session`` (``session_id``: the
    participant's session, if the caller has read it).

    Only what may change the lobby or the groups needs the session lock; steps that change one person
    alone (consent, instructions, a wrong quiz, the questionnaire) lock just their row, so a session's
    arrivals do not queue behind each other (measured with bench/load.py).
    """
    try:
        if with_session:
            if session_id is None:
                session_id = Participant.objects.values_list("session_id", flat=True).get(pk=participant_id)
            _lock_session(session_id)
        return (Participant.objects.select_for_update(of=("self",)).select_related("session__experiment")
                .get(pk=participant_id))
    except Participant.DoesNotExist:
        raise RuleError("unknown_participant", "No such participant.") from None


def _peek_quiz(participant_id: int) -> tuple[int, list[dict[str, Any]]]:
    """The participant's session id and their experiment's quiz, read without locking (to decide which locks an
    action needs), in one query."""
    try:
        return Participant.objects.values_list("session_id", "session__experiment__quiz").get(pk=participant_id)
    except Participant.DoesNotExist:
        raise RuleError("unknown_participant", "No such participant.") from None


def _own_view_on_commit(p: Participant) -> None:
    """Send a person not yet in a group their new view once the transaction commits, built from the locked row
    (its session and experiment loaded with it) rather than read again by their connection."""
    from experiment.selectors import pregame_state

    events.view_to_seat_on_commit(p.pk, pregame_state(p))


def _require_stage(p: Participant, stage: str) -> None:
    if p.status != stage:
        raise RuleError("wrong_stage", f"This step is not open now (you are at: {p.get_status_display().lower()}).")


# ---- joining and the pre-game stages ---------------------------------------------------------------

def _clean_recruitment_id(value: str | None, name: str) -> str:
    value = (value or "").strip()
    # ASCII only: str.isalnum also accepts "²" and look-alike letters (Cyrillic "а" for Latin "a"),
    # which would let two different ids print the same in an export or a payment list.
    if len(value) > MAX_RECRUITMENT_ID or not all(ch.isascii() and (ch.isalnum() or ch in "-_.") for ch in value):
        raise RuleError("invalid_recruitment_id", f"{name} must be at most {MAX_RECRUITMENT_ID} letters, digits, '-', '_' or '.'.")
    return value


@transaction.atomic
def participant_join(*, session_id: int, prolific_pid: str = "", study_id: str = "",
                     recruitment_session_id: str = "") -> Participant:
    """A person opens the join link. The same PROLIFIC_PID in the same session gets the same seat back."""
    pid = _clean_recruitment_id(prolific_pid, "PROLIFIC_PID")
    sid = _clean_recruitment_id(study_id, "STUDY_ID")
    rsid = _clean_recruitment_id(recruitment_session_id, "SESSION_ID")
    session = _lock_session(session_id)
    if pid:
        # One row at most (unique per session): .get() asks without an ORDER BY (first() would order it).
        try:
            return session.participants.get(prolific_pid=pid)
        except Participant.DoesNotExist:
            pass
    if session.status != Session.Status.OPEN:
        raise RuleError("session_closed", "This study is not accepting participants at the moment.")
    if not _lobby_conditions(session):
        raise RuleError("no_human_seats", "This study has no places for participants: its groups are played by AI "
                                          "agents only.")
    people = session.participants.filter(controller=P.Controller.PERSON).count()
    if people >= session.capacity + session.over_recruitment:
        raise RuleError("session_full", "This study is full. Thank you for your interest.")
    design.freeze(session)
    p = Participant.objects.create(session=session, prolific_pid=pid, study_id=sid, recruitment_session_id=rsid)
    _log(session_id=session.pk, type="participant.joined", participant=p,
         payload={"has_recruitment_id": bool(pid)})
    return p


@transaction.atomic
def consent_submit(*, participant_id: int, accept: bool) -> None:
    p = _lock_participant(participant_id, with_session=False)
    _require_stage(p, P.Status.CONSENT)
    if not isinstance(accept, bool):
        raise RuleError("invalid_message", '"accept" must be true or false.')
    p.status = P.Status.INSTRUCTIONS if accept else P.Status.DECLINED
    if not accept:
        p.finished_at = timezone.now()
    p.save(update_fields=["status", "finished_at"])
    _log(session_id=p.session_id, type="consent.given" if accept else "consent.declined", participant=p)
    _own_view_on_commit(p)


@transaction.atomic
def instructions_done(*, participant_id: int) -> None:
    session_id, quiz = _peek_quiz(participant_id)
    p = _lock_participant(participant_id, with_session=not quiz, session_id=session_id)  # without a quiz: the lobby
    _require_stage(p, P.Status.INSTRUCTIONS)
    _log(session_id=p.session_id, type="instructions.read", participant=p)
    if quiz:
        p.status = P.Status.QUIZ
        p.save(update_fields=["status"])
        _own_view_on_commit(p)
    else:
        _lobby_enter(p)


@transaction.atomic
def quiz_submit(*, participant_id: int, answers: object) -> dict[str, Any]:
    """Check the comprehension quiz. Wrong answers may be retried; the result lists the wrong ones."""
    session_id, quiz = _peek_quiz(participant_id)
    wrong = ([i for i, item in enumerate(quiz) if str(answers.get(str(i), "")) != item["answer"]]
             if isinstance(answers, dict) else None)
    # Only right answers enter the lobby.
    p = _lock_participant(participant_id, with_session=wrong == [], session_id=session_id)
    _require_stage(p, P.Status.QUIZ)
    if not isinstance(answers, dict) or wrong is None:
        raise RuleError("invalid_message", '"answers" must map question numbers to answers.')
    p.quiz_attempts += 1
    p.save(update_fields=["quiz_attempts"])
    _log(session_id=p.session_id, type="quiz.submitted", participant=p,
         payload={"attempt": p.quiz_attempts, "wrong": wrong, "answers": {k: str(v)[:200] for k, v in list(answers.items())[:50]}})
    if wrong:
        _own_view_on_commit(p)
        return {"correct": False, "wrong": wrong}
    _lobby_enter(p)
    return {"correct": True, "wrong": []}


def _lobby_enter(p: Participant) -> None:
    """Call holding the session lock."""
    p.status = P.Status.LOBBY
    p.lobby_at = timezone.now()
    p.save(update_fields=["status", "lobby_at"])
    _log(session_id=p.session_id, type="lobby.entered", participant=p)
    views = lobby_match(p.session, now=p.lobby_at)
    if str(p.pk) in views:  # (someone who got a group at once was sent their game already)
        # Not following the lobby's channel yet: the person's own connection gets their view.
        events.view_to_seat_on_commit(p.pk, views[str(p.pk)])


def lobby_match(session: Session, *, now: datetime, changed: bool = True) -> dict[str, dict[str, Any]]:
    """Form every group the lobby allows, by arrival. Call holding the session lock. Returns the views of those
    still waiting, by participant id.

    The people still waiting are sent their new views (on the lobby's channel) when a group formed or the caller
    says the lobby ``changed`` (the sweep calls this every second and must not re-send every waiting person's
    state for nothing); the people who got a group, theirs (on their own channels). Both are built here, under
    the lock, rather than read again by every connection."""
    from experiment.selectors import lobby_states

    experiment = session.experiment
    params = experiment.params()
    waiting = list(session.participants.filter(status=P.Status.LOBBY, controller=P.Controller.PERSON)
                   .order_by("lobby_at", "id"))
    fill_after = session.synthetic_fill_after
    fill_due = bool(waiting) and fill_after is not None and now - waiting[0].lobby_at >= timedelta(seconds=fill_after)
    # The arms are read only when a group may form: the sweep calls this every second for every waiting lobby.
    conditions = _lobby_conditions(session) if len(waiting) >= params.n_humans or fill_due else []
    formed = []
    while conditions and len(waiting) >= params.n_humans:
        formed.append(_group_form(session, waiting[: params.n_humans], params, now, conditions=conditions))
        waiting = waiting[params.n_humans:]
    if conditions and waiting and fill_due:
        formed.append(_group_form(session, waiting, params, now, conditions=conditions))
        waiting = []
    states = lobby_states(session, waiting) if formed or changed else {}
    if states:
        # "partial": whoever follows the lobby but is not among them (they just got a group) ignores it.
        events.send_on_commit(events.lobby_channel(session.pk), {"type": "seat.states", "states": states, "partial": True})
    return states


def _lobby_conditions(session: Session) -> list[Condition]:
    """The arms a group formed from people can be assigned to: the hybrid ones, when the design has human seats."""
    if session.experiment.n_humans < 1:
        return []
    return list(session.experiment.conditions.filter(society=Society.HYBRID))


def _group_form(session: Session, people: list[Participant], params: game.Params, now: datetime, *,
                conditions: list[Condition], society: str = Society.HYBRID) -> Group:
    """Seat a new group in one of ``conditions`` (balanced over the session's groups in them). An AI-only group
    gets a bot in every seat (``people`` is empty); its seats and roles are those of the design."""
    from bots.automation import bot_controller

    counts = dict.fromkeys((c.name for c in conditions), 0)
    counts.update(session.groups.filter(condition__in=conditions).values("condition__name").annotate(n=Count("id"))
                  .values_list("condition__name", "n"))
    number = (session.groups.aggregate(m=Max("number"))["m"] or 0) + 1
    # A session seed (simulations) pins every group's randomness independently of database ids.
    root = (session.seed,) if session.seed is not None else (session.pk, session.code)
    seed = game.rng(*root, "group", number).randrange(2**31)
    condition = next(c for c in conditions if c.name == game.pick_condition(counts, seed, number))
    design.freeze(session)
    group = Group.objects.create(session=session, condition=condition, number=number, seed=seed, society=society)
    if society == Society.AI_ONLY:
        params = dataclasses.replace(params, n_bot_selectors=params.n_selectors, n_bot_candidates=params.n_candidates)
    synthetic = params.n_humans - len(people)
    humans = list(people) + [
        Participant(session=session, kind=P.Kind.HUMAN, controller=P.Controller.SYNTHETIC) for _ in range(synthetic)
    ]
    seats = {}
    for plan in game.plan_seats(params.n_humans, params, seed):
        if plan.is_bot:
            p = Participant(session=session, kind=P.Kind.BOT, controller=bot_controller(group))
        else:
            p = humans[plan.human_index]
        p.group, p.role, p.seat, p.status = group, plan.role, plan.seat, P.Status.PLAYING
        p.save()
        seats[plan.seat] = {"participant": p.pk, "role": plan.role, "kind": p.kind, "controller": p.controller}
    if society == Society.AI_ONLY:
        # Its bots join when staff start the society, not while the call seats the groups before this one.
        group.participants.update(joined_at=now)
    _log(session_id=session.pk, type="group.formed", group=group,
         payload={"condition": condition.name, "society": society, "seats": seats, "synthetic_humans": synthetic,
                  "seed": seed})
    done = _advance(group, params, now, _phase_open(group, 1, Phase.PITCH, params, now))
    # Each person's first view of the game goes to their own channel (they follow the group's from then on).
    from experiment.selectors import group_states

    states = group_states(group, done)
    for p in people:
        events.view_to_seat_on_commit(p.pk, states[str(p.pk)])
    return group


# ---- phases ------------------------------------------------------------------------------------------

def _seats(group: Group, role: str) -> list[Participant]:
    return list(group.participants.filter(role=role).order_by("seat"))


def pending_seats(group: Group, params: game.Params) -> list[Participant]:
    """Seats that still owe an action in the current phase (for the return phase: one per owed return)."""
    return _owed(group, params)[0]


def _owed(group: Group, params: game.Params) -> tuple[list[Participant], dict[str, int]]:
    """The seats that still owe an action in the current phase, and the phase's progress (as :func:`progress`
    counts it), from one query."""
    r, phase = group.round_number, group.phase
    if phase in (Phase.PITCH, Phase.CHOICE):  # the seats of the role, each with whether its row for the round exists
        role, rows, of = ((P.Role.CANDIDATE, Message.objects.filter(candidate=OuterRef("pk")), params.n_candidates)
                          if phase == Phase.PITCH else
                          (P.Role.SELECTOR, Choice.objects.filter(selector=OuterRef("pk")), params.n_selectors))
        seats = list(group.participants.filter(role=role).annotate(acted=Exists(rows.filter(round_number=r)))
                     .order_by("seat"))
        return [s for s in seats if not s.acted], {"done": sum(s.acted for s in seats), "of": of}
    if phase == Phase.RETURN:
        chosen = list(Choice.objects.filter(group=group, round_number=r, candidate__isnull=False)
                      .select_related("candidate").annotate(returned=Exists(Return.objects.filter(choice=OuterRef("pk"))))
                      .order_by("selector__seat"))
        return ([c.candidate for c in chosen if not c.returned],
                {"done": sum(c.returned for c in chosen), "of": len(chosen)})
    if phase == Phase.BELIEF:
        per = params.n_candidates
        selectors = list(group.participants.filter(role=P.Role.SELECTOR)
                         .annotate(given=Count("beliefs", filter=Q(beliefs__round_number=r))).order_by("seat"))
        return [s for s in selectors if s.given < per], {"done": sum(s.given >= per for s in selectors),
                                                         "of": params.n_selectors}
    return [], {"done": 0, "of": 0}


def _counted(group: Group, params: game.Params) -> tuple[bool, dict[str, int]]:
    """Whether anyone still owes an action in the current phase, and the phase's progress, equal to what
    :func:`_owed` gives, from the same query read as one value per seat: no rows built, no ORDER BY (Django
    compiles one against every selected column). Enough for an action that only asks whether its phase is done,
    and for every view's progress."""
    r, phase = group.round_number, group.phase
    # .order_by(): the models' default orderings join other tables; only the values are counted here.
    if phase in (Phase.PITCH, Phase.CHOICE):
        role, rows, of = ((P.Role.CANDIDATE, Message.objects.filter(candidate=OuterRef("pk")), params.n_candidates)
                          if phase == Phase.PITCH else
                          (P.Role.SELECTOR, Choice.objects.filter(selector=OuterRef("pk")), params.n_selectors))
        acted = list(group.participants.filter(role=role).annotate(acted=Exists(rows.filter(round_number=r)))
                     .order_by().values_list("acted", flat=True))
        return not all(acted), {"done": sum(acted), "of": of}
    if phase == Phase.RETURN:
        returned = list(Choice.objects.filter(group=group, round_number=r, candidate__isnull=False)
                        .annotate(returned=Exists(Return.objects.filter(choice=OuterRef("pk"))))
                        .order_by().values_list("returned", flat=True))
        return not all(returned), {"done": sum(returned), "of": len(returned)}
    if phase == Phase.BELIEF:
        per = params.n_candidates
        given = list(group.participants.filter(role=P.Role.SELECTOR)
                     .annotate(given=Count("beliefs", filter=Q(beliefs__round_number=r))).order_by()
                     .values_list("given", flat=True))
        return any(n < per for n in given), {"done": sum(n >= per for n in given), "of": params.n_selectors}
    return False, {"done": 0, "of": 0}


def progress(group: Group, params: game.Params) -> dict[str, int]:
    return _counted(group, params)[1]


Owed = tuple[list[Participant], dict[str, int]]  # what _owed gives: who still owes an action, the progress


def _phase_open(group: Group, round_number: int, phase: Phase, params: game.Params, now: datetime) -> Owed:
    """Open a phase; returns what is owed in it."""
    from bots.automation import schedule_seats

    group.round_number, group.phase = round_number, phase
    group.phase_started_at = now
    group.phase_deadline = now + timedelta(seconds=params.durations[phase])
    group.version += 1
    group.save(update_fields=["round_number", "phase", "phase_started_at", "phase_deadline", "version"])
    _log(session_id=group.session_id, type="phase.started", group=group,
         payload={"deadline": group.phase_deadline.isoformat()})
    # A dropped seat whose policy is "defaults continue" acts at once: nobody waits for someone gone.
    owed = _owed(group, params)
    gone = [p for p in owed[0] if p.status == P.Status.DROPPED and p.controller == P.Controller.PERSON]
    if gone:
        _apply_defaults(group, params, gone, count_timeouts=False)
        owed = _owed(group, params)
    # On commit, callbacks run in the order they were registered: the group hears of its new phase first,
    # and only then are the deadline and the bots' jobs handed to the broker (a round trip each).
    events.refresh_on_commit(events.group_channel(group.pk))
    schedule("phase_close", at=group.phase_deadline, group_id=group.pk, round_number=round_number, phase=str(phase))
    schedule_seats(group=group, params=params, pending=owed[0], now=now)
    return owed


def _advance(group: Group, params: game.Params, now: datetime, owed: Owed | None = None) -> dict[str, int] | None:
    """Close phases whose every action is in (several in a row if needed). Call holding the group lock.

    ``owed``: what is owed in the current phase, if the caller knows. Returns the progress of the phase in which
    it stops (None when that phase asks nothing of anyone, or the game has ended)."""
    while group.status == Group.Status.PLAYING and game.actors(Phase(group.phase)):
        pending, done = owed or _counted(group, params)  # (whether anyone owes: which seats, only a deadline needs)
        if pending:
            return done
        owed = _phase_finish(group, params, now, missing=[])
    return None


def _phase_finish(group: Group, params: game.Params, now: datetime, *, count_timeouts: bool = True,
                  missing: list[Participant] | None = None) -> Owed | None:
    """Apply defaults for what is missing, settle the round if due, open the next phase or end the game.
    ``missing``: the seats that still owe an action, if the caller knows. Returns what the next phase owes."""
    if missing is None:
        missing = pending_seats(group, params)
    if missing:
        _apply_defaults(group, params, missing, count_timeouts=count_timeouts)
    _log(session_id=group.session_id, type="phase.closed", group=group,
         payload={"timed_out_seats": sorted({p.seat for p in missing})})
    if group.phase == Phase.RETURN:
        _settle_round(group, params)
    following = game.next_phase(group.round_number, Phase(group.phase), params)
    if following is None:
        _group_finish(group, now)
        return None
    return _phase_open(group, following[0], following[1], params, now)


def _apply_defaults(group: Group, params: game.Params, seats: Iterable[Participant], *, count_timeouts: bool) -> None:
    r, phase = group.round_number, group.phase
    seats = list(seats)
    if phase == Phase.PITCH:
        Message.objects.bulk_create([Message(group=group, round_number=r, candidate=p, timed_out=True) for p in seats])
    elif phase == Phase.CHOICE:
        candidates = {p.seat: p for p in _seats(group, P.Role.CANDIDATE)}
        for p in seats:
            seat = game.default_choice(group.seed, p.seat, r, list(candidates), params)
            _choice_create(group, params, p, candidates.get(seat) if seat else None, 0, timed_out=True,
                           candidates=list(candidates))
    elif phase == Phase.RETURN:
        owed = Choice.objects.filter(group=group, round_number=r, candidate__in=seats, return_decision__isnull=True)
        Return.objects.bulk_create([Return(choice=c, candidate_id=c.candidate_id, available=c.multiplied, returned=0,
                                           timed_out=True) for c in owed])
    elif phase == Phase.BELIEF:
        candidates = _seats(group, P.Role.CANDIDATE)
        for p in seats:
            have = set(Belief.objects.filter(selector=p, round_number=r).values_list("candidate_id", flat=True))
            Belief.objects.bulk_create([Belief(group=group, round_number=r, selector=p, candidate=c, timed_out=True)
                                        for c in candidates if c.pk not in have])
    for p in {p.pk: p for p in seats}.values():
        _log(session_id=group.session_id, type="default.applied", group=group, participant=p,
             payload={"counted": count_timeouts})
        if count_timeouts:
            _timeout_count(group, params, p)


def _timeout_count(group: Group, params: game.Params, p: Participant) -> None:
    p.consecutive_timeouts += 1
    fields = ["consecutive_timeouts"]
    if p.controller == P.Controller.PERSON and p.status == P.Status.PLAYING and game.is_dropped(p.consecutive_timeouts, params):
        p.status = P.Status.DROPPED
        p.finished_at = timezone.now()
        fields += ["status", "finished_at"]
        _log(session_id=group.session_id, type="participant.dropped", group=group, participant=p,
             payload={"consecutive_timeouts": p.consecutive_timeouts})
        if params.bot_takes_over:
            from bots.automation import bot_controller

            p.controller = bot_controller(group)
            fields.append("controller")
            _log(session_id=group.session_id, type="seat.takeover", group=group, participant=p,
                 payload={"controller": p.controller})
        events.refresh_on_commit(events.seat_channel(p.pk))
    p.save(update_fields=fields)


def _settle_round(group: Group, params: game.Params) -> None:
    r = group.round_number
    choices = list(Choice.objects.filter(group=group, round_number=r).select_related("selector", "candidate", "return_decision"))
    transfers = [
        game.Transfer(selector=c.selector.seat, candidate=c.candidate.seat if c.candidate else None, sent=c.sent,
                      returned=c.return_decision.returned if c.candidate else 0)
        for c in choices
    ]
    # The models' default ordering, without the joins it costs: within one group it is role, seat, id.
    seats = {p.seat: p for p in group.participants.order_by("role", "seat", "id")}
    selectors = [s for s, p in seats.items() if p.role == P.Role.SELECTOR]
    candidates = [s for s, p in seats.items() if p.role == P.Role.CANDIDATE]
    payoffs = game.round_payoffs(transfers, selectors, candidates, params)
    RoundPayoff.objects.bulk_create([RoundPayoff(participant=seats[s], round_number=r, points=v) for s, v in payoffs.items()])
    for seat, points in payoffs.items():
        seats[seat].payoff += points
    Participant.objects.bulk_update([seats[seat] for seat in payoffs], ["payoff"])  # one query, not one per seat
    _log(session_id=group.session_id, type="round.settled", group=group, payload={"payoffs": payoffs})


def _group_finish(group: Group, now: datetime) -> None:
    group.status = Group.Status.FINISHED
    group.finished_at = now
    group.phase_deadline = None
    group.version += 1
    group.save(update_fields=["status", "finished_at", "phase_deadline", "version"])
    group.participants.filter(status=P.Status.PLAYING, controller=P.Controller.PERSON).update(status=P.Status.QUESTIONNAIRE)
    group.participants.filter(status=P.Status.PLAYING).exclude(controller=P.Controller.PERSON).update(
        status=P.Status.FINISHED, finished_at=now)
    _log(session_id=group.session_id, type="group.finished", group=group)
    events.refresh_on_commit(events.group_channel(group.pk))


def _overdue(now: datetime) -> QuerySet[Group]:
    """Groups playing a phase whose deadline has passed (read without a lock)."""
    return Group.objects.filter(status=Group.Status.PLAYING, phase_deadline__lte=now)


def phase_close(*, group_id: int, round_number: int, phase: str, reason: str, actor_id: int | None = None) -> bool:
    """Close a phase at its deadline (or at once, for ``reason="staff"``). False when it was already closed."""
    if reason == "deadline" and not _overdue(timezone.now()).filter(
            pk=group_id, round_number=round_number, phase=phase).exists():
        # Most deadline jobs come after the group's last decision closed the phase: a plain read tells them so,
        # without a transaction or a wait for the group's lock (held by whoever is acting in the new phase).
        # Whatever this read finds is checked again under the lock below.
        return False
    with transaction.atomic():
        group = _lock_group(group_id)
        now = timezone.now()
        if group.status != Group.Status.PLAYING or (group.round_number, group.phase) != (round_number, phase):
            return False
        if reason == "deadline" and (group.phase_deadline is None or group.phase_deadline > now):
            return False
        params = group.session.experiment.params()
        if reason != "deadline":
            _log(session_id=group.session_id, type="phase.closed_by_staff", group=group, actor_id=actor_id)
        _views_to_group(group, _advance(group, params, now, _phase_finish(group, params, now)))
        return True


def sweep(now: datetime | None = None) -> int:
    """Close every overdue phase, run the lobbies' clocks and remove the connections of lost web processes. Safe to
    run anywhere, any number of times."""
    now = now or timezone.now()
    closed = 0
    due = _overdue(now).values_list("pk", "round_number", "phase")
    for group_id, round_number, phase in due:
        try:
            closed += phase_close(group_id=group_id, round_number=round_number, phase=phase, reason="deadline")
        except Exception:
            logger.exception("closing phase of group %s failed", group_id)
    lobbies = set(Participant.objects.filter(status=P.Status.LOBBY, controller=P.Controller.PERSON)
                  .values_list("session_id", flat=True).distinct())
    for session_id in lobbies:
        try:
            lobby_sweep(session_id=session_id, now=now)
        except Exception:  # one broken lobby must not stop the others from being swept
            logger.exception("sweeping the lobby of session %s failed", session_id)
    try:
        presence_sweep(now)
    except Exception:
        logger.exception("sweeping lost connections failed")
    return closed


@transaction.atomic
def lobby_sweep(*, session_id: int, now: datetime) -> None:
    session = _lock_session(session_id)
    limit = now - timedelta(seconds=session.experiment.lobby_timeout_seconds)
    expired = list(session.participants.filter(status=P.Status.LOBBY, controller=P.Controller.PERSON, lobby_at__lte=limit))
    for p in expired:
        p.status, p.finished_at = P.Status.LOBBY_TIMEOUT, now
        p.save(update_fields=["status", "finished_at"])
        _log(session_id=session_id, type="lobby.timeout", participant=p)
        events.refresh_on_commit(events.seat_channel(p.pk))
    lobby_match(session, now=now, changed=bool(expired))


# ---- game actions --------------------------------------------------------------------------------------

def _acting(participant_id: int, *, role: str, phase: Phase, round_number: object,
            automated: bool = False) -> tuple[Group, Participant, game.Params]:
    """Lock the participant's group and check that they may act now. ``automated``: a bot/synthetic call."""
    # One query reads the seat with its group, locking the group's row only (a seat never changes group); the
    # reason is asked only on refusal. (.get(), not .first(): first() orders by the primary key, and Django
    # compiles an ORDER BY against every selected column, here five tables' worth.)
    try:
        p = (Participant.objects.select_for_update(of=("group",))
             .select_related("group__session__experiment", "group__condition")
             .get(pk=participant_id, group__isnull=False))
    except Participant.DoesNotExist:
        if not Participant.objects.filter(pk=participant_id).exists():
            raise RuleError("unknown_participant", "No such participant.") from None
        raise RuleError("not_in_group", "You are not in a game yet.") from None
    group = p.group
    if group.status != Group.Status.PLAYING:
        raise RuleError("game_over", "The game has ended.")
    if group.paused_at is not None:
        raise RuleError("paused", "The experimenter has paused the game. Please wait.")
    if p.is_automated != automated:
        raise RuleError("seat_taken_over", "This seat is now played automatically.")
    if p.status == P.Status.DROPPED and not automated:
        raise RuleError("dropped", "You were removed from the game after missing several decisions.")
    if p.role != role:
        raise RuleError("wrong_role", f"Only {role}s can do this.")
    if not isinstance(round_number, int) or isinstance(round_number, bool):
        raise RuleError("invalid_message", '"round" must be a whole number.')
    if (group.round_number, group.phase) != (round_number, phase):
        raise RuleError("wrong_phase", f"This is not possible now: the group is in the {group.phase} phase of round "
                                       f"{group.round_number}.")
    if group.phase_deadline is not None and timezone.now() > group.phase_deadline:
        raise RuleError("phase_closed", "Time is up for this phase.")
    return group, p, group.session.experiment.params()


def _acted(group: Group, params: game.Params, p: Participant, type: str, payload: dict[str, Any], *,
           message: Message | None = None) -> None:
    """Bookkeeping shared by every accepted action. Call holding the group lock. ``message``: the pitch the action
    stored, if it was one (the actor's view shows it without reading it back)."""
    if p.consecutive_timeouts:
        p.consecutive_timeouts = 0
        p.save(update_fields=["consecutive_timeouts"])
    _log(session_id=group.session_id, type=type, group=group, participant=p, payload=payload)
    _bump(group)
    round_number, phase = group.round_number, group.phase
    now = timezone.now()
    done = _advance(group, params, now)
    _views_to_group(group, done)
    # (At the end of the game the group keeps its last round and phase, and the group's views were sent.)
    if group.status == Group.Status.PLAYING and (group.round_number, group.phase) == (round_number, phase):
        from experiment.selectors import progress_parts

        done = done or progress(group, params)  # (the phase of an action always asks something of someone)
        # Under the group's lock this is the progress of the version being committed: the actor's view,
        # asked for next, need not count again.
        progress_parts.keep_on_commit(group, done)
        # When the action closed the phase, the group's views already bring this seat its new state. Otherwise
        # the actor's own view is built here (the seat's rows are at hand under the lock), rather than asking
        # its connection to read it (a Redis round trip, a wait for a view thread, a read).
        if p.is_automated:  # nobody looks at a bot's view; a person whose seat it took over sees the end page
            events.refresh_on_commit(events.seat_channel(p.pk))
        else:
            from experiment.selectors import own_state

            events.view_to_seat_on_commit(p.pk, own_state(p, group, done, message=message))
        events.forward_on_commit(events.group_channel(group.pk), {
            "type": "progress", "version": group.version, "round": round_number, "phase": phase, **done})


def _views_to_group(group: Group, progress: dict[str, int] | None) -> None:
    """When this transaction asks the whole group to look again (a new phase, the end of the game), send every
    seat its view instead, read here once under the group's lock: at a phase change every person of the group
    wants a new state at once, and otherwise each of them reads their own, in whichever web process holds
    their connection (measured with bench/load.py and bench/hotpath.py: docs/benchmarks.md). ``progress``: what
    :func:`_advance` returned, the progress of the phase the group is in now (None: not counted)."""
    channel = events.group_channel(group.pk)
    if events.refresh_queued(channel):
        from experiment.selectors import group_states

        events.refresh_instead(channel, {"type": "seat.states", "states": group_states(group, progress)})


def _seconds_since_phase_start(group: Group) -> float | None:
    return (timezone.now() - group.phase_started_at).total_seconds() if group.phase_started_at else None


def _unique(message: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn a unique-constraint violation into a clear error: a decision submitted twice.

    The database's constraint is the check (asking first would cost every action a query, and a double
    submit can race past such a question anyway); the insert it refuses is the first write of the action, so
    nothing else has changed when it does."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except IntegrityError:
                raise RuleError("already_submitted", message) from None
        return wrapper
    return decorate


@_unique("You have already sent your message this round.")
@transaction.atomic
def pitch_submit(*, participant_id: int, round_number: int, text: object, automated: bool = False) -> None:
    group, p, params = _acting(participant_id, role=P.Role.CANDIDATE, phase=Phase.PITCH,
                               round_number=round_number, automated=automated)
    clean = game.check_message(text, params)
    message = Message.objects.create(group=group, round_number=round_number, candidate=p, text=clean,
                                     decided_by=p.controller, decision_seconds=_seconds_since_phase_start(group))
    _acted(group, params, p, "pitch.submitted", {"length": len(clean), "seconds": _seconds_since_phase_start(group)},
           message=message)


def _choice_create(group: Group, params: game.Params, selector: Participant, candidate: Participant | None,
                   sent: int, *, timed_out: bool, candidates: list[str]) -> Choice:
    """``candidates``: the group's candidate seats."""
    order = game.candidate_order(group.seed, selector.seat, group.round_number, candidates)
    label = ""
    if candidate is not None:
        label = game.identity_label(group.condition.label_policy(), group.round_number, candidate.kind == P.Kind.BOT)
    return Choice.objects.create(
        group=group, round_number=group.round_number, selector=selector, candidate=candidate,
        position=order.index(candidate.seat) + 1 if candidate else None, order=order, label_shown=label,
        sent=sent, multiplied=game.multiplied(sent, params), timed_out=timed_out,
        decided_by="" if timed_out else selector.controller,
        decision_seconds=None if timed_out else _seconds_since_phase_start(group),
    )


@_unique("You have already made your choice this round.")
@transaction.atomic
def choice_submit(*, participant_id: int, round_number: int, candidate: object, amount: object,
                  automated: bool = False) -> None:
    group, p, params = _acting(participant_id, role=P.Role.SELECTOR, phase=Phase.CHOICE,
                               round_number=round_number, automated=automated)
    candidates = {c.seat: c for c in _seats(group, P.Role.CANDIDATE)}
    chosen = candidates.get(candidate) if isinstance(candidate, str) else None
    if chosen is None:
        raise RuleError("unknown_candidate", "Choose one of the candidates shown.")
    sent = game.check_sent(amount, params)
    choice = _choice_create(group, params, p, chosen, sent, timed_out=False, candidates=list(candidates))
    _acted(group, params, p, "choice.submitted", {"candidate": chosen.seat, "sent": sent, "position": choice.position})


@_unique("You have already decided this return.")
@transaction.atomic
def return_submit(*, participant_id: int, round_number: int, selector: object, amount: object,
                  automated: bool = False) -> None:
    group, p, params = _acting(participant_id, role=P.Role.CANDIDATE, phase=Phase.RETURN,
                               round_number=round_number, automated=automated)
    # At most one row (a seat is unique in its group, a choice per selector and round): .get() asks for it without
    # the ORDER BY of first() (the default ordering would also join the selector again).
    choice = None
    if isinstance(selector, str):
        with contextlib.suppress(Choice.DoesNotExist):
            choice = Choice.objects.get(group=group, round_number=round_number, candidate=p, selector__seat=selector)
    if choice is None:
        raise RuleError("unknown_selector", "That selector did not choose you this round.")
    returned = game.check_returned(amount, choice.multiplied)
    Return.objects.create(choice=choice, candidate=p, available=choice.multiplied, returned=returned,
                          decided_by=p.controller, decision_seconds=_seconds_since_phase_start(group))
    _acted(group, params, p, "return.submitted", {"selector": selector, "returned": returned, "available": choice.multiplied})


@_unique("You have already given your guesses this round.")
@transaction.atomic
def belief_submit(*, participant_id: int, round_number: int, beliefs: object, automated: bool = False) -> None:
    group, p, params = _acting(participant_id, role=P.Role.SELECTOR, phase=Phase.BELIEF,
                               round_number=round_number, automated=automated)
    candidates = {c.seat: c for c in group.participants.filter(role=P.Role.CANDIDATE)}
    if not isinstance(beliefs, dict) or set(beliefs) != set(candidates):
        raise RuleError("incomplete_beliefs", f"Give a guess for every candidate: {', '.join(sorted(candidates))}.")
    rows = []
    for seat, entry in beliefs.items():
        if not isinstance(entry, dict) or entry.get("guess") not in ("human", "bot"):
            raise RuleError("invalid_belief", f'For candidate {seat}, guess "human" or "bot".')
        rows.append(Belief(group=group, round_number=round_number, selector=p, candidate=candidates[seat],
                           guess=entry["guess"], confidence=game.check_confidence(entry.get("confidence"))))
    Belief.objects.bulk_create(rows)
    _acted(group, params, p, "belief.submitted", {"beliefs": {b.candidate.seat: [b.guess, b.confidence] for b in rows}})


# ---- after the game ------------------------------------------------------------------------------------

@_unique("You have already answered the questionnaire.")
@transaction.atomic
def questionnaire_submit(*, participant_id: int, answers: object) -> None:
    from experiment.questionnaire import clean_answers

    p = _lock_participant(participant_id, with_session=False)
    _require_stage(p, P.Status.QUESTIONNAIRE)
    clean = clean_answers(answers)
    QuestionnaireResponse.objects.create(participant=p, answers=clean)
    p.status, p.finished_at = P.Status.FINISHED, timezone.now()
    p.save(update_fields=["status", "finished_at"])
    _log(session_id=p.session_id, type="questionnaire.submitted", participant=p)
    events.refresh_on_commit(events.seat_channel(p.pk))


def bonus_of(p: Participant) -> Decimal:
    return (Decimal(p.payoff) * p.session.experiment.bonus_per_point).quantize(Decimal("0.01"))


# ---- staff actions on live sessions (the cockpit) ----------------------------------------------------------
# Each is recorded in the event log with the staff user as actor.

def _playing_group(group_id: int) -> Group:
    group = _lock_group(group_id)
    if group.status != Group.Status.PLAYING:
        raise RuleError("game_over", "This group has already finished.")
    return group


@transaction.atomic
def group_pause(*, group_id: int, actor_id: int | None) -> None:
    """Stop the clock: the phase keeps what was left of its time; nobody can act until resumed."""
    group = _playing_group(group_id)
    if group.paused_at is not None:
        raise RuleError("already_paused", "This group is already paused.")
    now = timezone.now()
    group.paused_remaining = max(0.0, (group.phase_deadline - now).total_seconds()) if group.phase_deadline else 0.0
    group.paused_at, group.phase_deadline = now, None
    group.version += 1
    group.save(update_fields=["paused_at", "paused_remaining", "phase_deadline", "version"])
    _log(session_id=group.session_id, type="group.paused", group=group, actor_id=actor_id,
         payload={"remaining_seconds": group.paused_remaining})
    events.refresh_on_commit(events.group_channel(group.pk))


@transaction.atomic
def group_resume(*, group_id: int, actor_id: int | None) -> None:
    from bots.automation import schedule_seats

    group = _playing_group(group_id)
    if group.paused_at is None:
        raise RuleError("not_paused", "This group is not paused.")
    now = timezone.now()
    # At least a few seconds, so that people can see the game is running again before the phase ends.
    group.phase_deadline = now + timedelta(seconds=max(group.paused_remaining or 0.0, 5.0))
    paused_for = (now - group.paused_at).total_seconds()
    group.paused_at, group.paused_remaining = None, None
    group.version += 1
    group.save(update_fields=["paused_at", "paused_remaining", "phase_deadline", "version"])
    _log(session_id=group.session_id, type="group.resumed", group=group, actor_id=actor_id,
         payload={"paused_seconds": paused_for, "deadline": group.phase_deadline.isoformat()})
    params = group.session.experiment.params()
    schedule("phase_close", at=group.phase_deadline, group_id=group.pk, round_number=group.round_number, phase=group.phase)
    schedule_seats(group=group, params=params, pending=pending_seats(group, params), now=now)
    events.refresh_on_commit(events.group_channel(group.pk))


def group_phase_close_now(*, group_id: int, actor_id: int | None) -> None:
    """Close the current phase at once, applying the recorded defaults to whoever has not acted."""
    with transaction.atomic():
        group = _playing_group(group_id)
        if group.paused_at is not None:
            raise RuleError("paused", "Resume the group before closing its phase.")
        round_number, phase = group.round_number, group.phase
    phase_close(group_id=group_id, round_number=round_number, phase=phase, reason="staff", actor_id=actor_id)


@transaction.atomic
def participant_remove(*, participant_id: int, actor_id: int | None, replace_with_bot: bool) -> None:
    """Take a person out of the study. In a game, their seat gets defaults or, if asked, a bot from now on."""
    from bots.automation import bot_controller, schedule_seats

    group_id = Participant.objects.filter(pk=participant_id).values_list("group_id", flat=True).first()
    if group_id is not None:
        group = _lock_group(group_id)
    else:
        _lock_participant(participant_id)
        group = None
    p = Participant.objects.get(pk=participant_id)
    if p.controller != P.Controller.PERSON:
        raise RuleError("not_a_person", "Only seats played by a person can be removed or replaced.")
    if p.status in (P.Status.FINISHED, P.Status.DECLINED, P.Status.LOBBY_TIMEOUT, P.Status.DROPPED):
        raise RuleError("not_active", "This participant has already left the study.")
    if replace_with_bot and (group is None or group.status != Group.Status.PLAYING):
        raise RuleError("not_in_game", "Only a seat in a running game can be handed to a bot.")
    now = timezone.now()
    p.status, p.finished_at = P.Status.DROPPED, now
    fields = ["status", "finished_at"]
    _log(session_id=p.session_id, type="participant.removed", group=group, participant=p, actor_id=actor_id,
         payload={"replaced_with_bot": replace_with_bot})
    if replace_with_bot:
        p.controller = bot_controller(group)
        fields.append("controller")
        _log(session_id=p.session_id, type="seat.takeover", group=group, participant=p, actor_id=actor_id,
             payload={"controller": p.controller})
    p.save(update_fields=fields)
    events.refresh_on_commit(events.seat_channel(p.pk))
    if group is None or group.status != Group.Status.PLAYING:
        if p.session_id:
            events.refresh_on_commit(events.lobby_channel(p.session_id))
        return
    params = group.session.experiment.params()
    pending = [x for x in pending_seats(group, params) if x.pk == p.pk]
    if pending and group.paused_at is None:
        if replace_with_bot:
            schedule_seats(group=group, params=params, pending=[p], now=now)
        else:
            _apply_defaults(group, params, pending, count_timeouts=False)
            _bump(group)
            _advance(group, params, now)
    events.refresh_on_commit(events.group_channel(group.pk))


@transaction.atomic
def session_end(*, session_id: int, actor_id: int | None) -> None:
    """End the session now: recruitment closes, every running group plays out its remaining phases by
    defaults (recorded as such), and everyone still in the study is sent to the end page."""
    session = _lock_session(session_id)
    if session.ended_at is not None:
        raise RuleError("already_ended", "This session has already ended.")
    now = timezone.now()
    session.status, session.ended_at = Session.Status.CLOSED, now
    session.save(update_fields=["status", "ended_at"])
    _log(session_id=session.pk, type="session.ended", actor_id=actor_id)
    params = session.experiment.params()
    for group_id in session.groups.filter(status=Group.Status.PLAYING).values_list("pk", flat=True):
        group = _lock_group(group_id)
        group.paused_at = group.paused_remaining = None
        while group.status == Group.Status.PLAYING:
            _phase_finish(group, params, now, count_timeouts=False)
    still_in = session.participants.filter(controller=P.Controller.PERSON).exclude(
        status__in=[P.Status.FINISHED, P.Status.DECLINED, P.Status.LOBBY_TIMEOUT, P.Status.DROPPED])
    for p in still_in:
        _log(session_id=session.pk, type="participant.ended_by_staff", participant=p, actor_id=actor_id,
             payload={"from_stage": p.status})
        events.refresh_on_commit(events.seat_channel(p.pk))
    still_in.update(status=P.Status.FINISHED, finished_at=now)
    events.refresh_on_commit(events.lobby_channel(session.pk))


MAX_SOCIETY_GROUPS = 200  # per call: one transaction holds the session lock while it seats them


@transaction.atomic
def society_start(*, session_id: int, groups: int, condition: str | None = None, actor_id: int | None = None) -> list[int]:
    """Start ``groups`` AI-only groups in the session: a bot in every seat, in the experiment's AI-only arms
    (balanced over them, or all in ``condition``). They play through the same services, rules, deadlines and
    jobs as any group. Returns the new groups' ids."""
    if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= MAX_SOCIETY_GROUPS:
        raise RuleError("invalid_groups", f"Give a number of groups from 1 to {MAX_SOCIETY_GROUPS}.")
    session = _lock_session(session_id)
    if session.ended_at is not None:
        raise RuleError("session_ended", "This session has ended: start AI-only groups in a new session.")
    arms = list(session.experiment.conditions.filter(society=Society.AI_ONLY))
    if condition is not None:
        arms = [c for c in arms if c.name == condition]
        if not arms:
            raise RuleError("unknown_condition", f'The experiment has no AI-only condition named "{condition}"'[:200] + ".")
    if not arms:
        raise RuleError("no_ai_only_condition", "The experiment has no AI-only condition: set a condition's society "
                                                "to AI only in the admin first.")
    now = timezone.now()
    _log(session_id=session.pk, type="society.started", actor_id=actor_id,
         payload={"groups": groups, "condition": condition})
    params = session.experiment.params()
    return [_group_form(session, [], params, now, conditions=arms, society=Society.AI_ONLY).pk for _ in range(groups)]


# ---- presence: the seats' open websockets (experiment/presence.py) ------------------------------------------
# Participant.connections is the number of the seat's SeatConnection rows. Every change locks the seat's row
# first, then touches its connection rows: one lock order for opening, closing and the sweep.

def _presence_lock(participant_id: int) -> Participant | None:
    return (Participant.objects.select_for_update(no_key=True).only("session_id", "group_id")
            .filter(pk=participant_id).order_by("pk").first())  # (the default ordering would join the group)


def connection_open(*, participant_id: int, process: str) -> int:
    """Record one open websocket of the seat, served by web process run ``process`` (several tabs count
    separately). Returns the row's id, which the connection deletes when it closes."""
    now = timezone.now()
    with transaction.atomic():
        p = _presence_lock(participant_id)
        if p is None:
            raise RuleError("unknown_participant", "No such participant.")
        row = SeatConnection.objects.create(participant_id=participant_id, process=process, opened_at=now, seen_at=now)
        Participant.objects.filter(pk=participant_id).update(connections=F("connections") + 1, last_seen_at=now)
        Event.objects.create(session_id=p.session_id, group_id=p.group_id, participant_id=participant_id,
                             type="participant.connected")
        events.monitor_on_commit(p.session_id, p.group_id)
    return row.pk


def connection_close(*, connection_id: int, participant_id: int) -> bool:
    """The websocket closed: delete its row. False when the sweep had already removed (and counted) it."""
    now = timezone.now()
    with transaction.atomic():
        p = _presence_lock(participant_id)
        if p is None or not SeatConnection.objects.filter(pk=connection_id).delete()[0]:
            return False
        Participant.objects.filter(pk=participant_id).update(connections=Greatest(F("connections") - 1, 0),
                                                             last_seen_at=now)
        Event.objects.create(session_id=p.session_id, group_id=p.group_id, participant_id=participant_id,
                             type="participant.disconnected")
        events.monitor_on_commit(p.session_id, p.group_id)
    return True


def connections_heartbeat(*, process: str, expected: int) -> set[int] | None:
    """Mark every connection of web process run ``process`` as alive, in one UPDATE. Returns None when the
    ``expected`` rows were all there; else the ids of the rows still there (the sweep took the others)."""
    if SeatConnection.objects.filter(process=process).update(seen_at=timezone.now()) >= expected:
        return None
    return set(SeatConnection.objects.filter(process=process).values_list("pk", flat=True))


def presence_sweep(now: datetime | None = None) -> int:
    """Remove the connections whose web process stopped beating (killed, crashed): their disconnects never ran.
    Returns how many were removed. Costs one indexed query when there are none (every sweep)."""
    now = now or timezone.now()
    limit = now - timedelta(seconds=settings.PARTNERLAB_PRESENCE_STALE_SECONDS)
    stale = set(SeatConnection.objects.filter(seen_at__lt=limit).values_list("participant_id", flat=True))
    removed = 0
    for participant_id in sorted(stale):
        try:  # one transaction per seat: other transactions lock several seats, in their own order
            removed += _connections_lost(participant_id, limit)
        except Exception:
            logger.exception("removing the lost connections of participant %s failed", participant_id)
    return removed


@transaction.atomic
def _connections_lost(participant_id: int, limit: datetime) -> int:
    p = _presence_lock(participant_id)
    if p is None:
        return 0
    # Locked, then re-checked: a row whose process beat in the meantime is no longer stale.
    lost = list(SeatConnection.objects.select_for_update().filter(participant_id=participant_id, seen_at__lt=limit)
                .values_list("pk", "process"))
    if not lost:
        return 0
    SeatConnection.objects.filter(pk__in=[pk for pk, _ in lost]).delete()
    # Counted afresh from the rows: this also corrects a count that had drifted.
    live = SeatConnection.objects.filter(participant_id=participant_id).count()
    Participant.objects.filter(pk=participant_id).update(connections=live)
    Event.objects.bulk_create([
        Event(session_id=p.session_id, group_id=p.group_id, participant_id=participant_id, type="participant.disconnected",
              payload={"reason": "server process lost", "process": process})
        for _, process in lost])
    events.monitor_on_commit(p.session_id, p.group_id)
    return len(lost)


@transaction.atomic
def session_status_set(*, session_id: int, status: str, actor_id: int | None) -> None:
    """Open, pause or close recruitment. A change is logged with the staff user who made it; setting the
    status a session already has changes and logs nothing. Participants already in stay in."""
    if status not in Session.Status.values:
        raise RuleError("invalid_status", f"Recruitment status must be one of {', '.join(Session.Status.values)}, not {status!r}.")
    try:
        session = _lock_session(session_id)
    except Session.DoesNotExist:
        raise RuleError("unknown_session", "No such session.") from None
    if session.ended_at is not None and status != Session.Status.CLOSED:
        raise RuleError("already_ended", "This session has ended; its recruitment cannot reopen. Create a new session.")
    if session.status == status:
        return
    previous, session.status = session.status, status
    session.save(update_fields=["status"])
    _log(session_id=session.pk, type="session.status_changed", actor_id=actor_id, payload={"from": previous, "to": status})
