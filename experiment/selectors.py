"""Reads. :func:`seat_state` is the one view of the game a seat gets: browsers, bots and synthetic
participants all see exactly this (so a bot never knows more than a human in its seat).

It never reveals whether another seat is a bot, except through the identity label that the
condition prescribes.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from django.db import connection, transaction
from django.utils import timezone

from experiment import game, services
from experiment.game import Phase
from experiment.models import (
    Belief,
    Choice,
    Experiment,
    Group,
    Message,
    Participant,
    RoundPayoff,
    Session,
)
from experiment.questionnaire import QUESTIONS

P = Participant
T = TypeVar("T")


def seat_state(participant_id: int, *, for_controller: bool = False) -> dict[str, Any]:
    """The seat's view. ``for_controller``: the view of whatever plays the seat now. When a bot takes
    over a dropped person's seat, the person's page shows the dropout while the bot plays on."""
    p = Participant.objects.select_related("group").get(pk=participant_id)
    group = p.group
    stage = _stage(p, group, for_controller=for_controller)
    if stage == P.Status.PLAYING and group is not None:
        shared = phase_parts.get(group)
        params = shared.experiment.params()
        return _state(p, group, stage, shared.experiment,
                      _GroupView(group, params, shared, _read_rows(group, p), dict(progress_parts.get(group, params))))
    p.session = Session.objects.select_related("experiment").get(pk=p.session_id)
    return _state(p, group, stage, p.session.experiment, None)


def group_states(group: Group, progress: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Every person's view of a group, by participant id (as a string), each equal to what :func:`seat_state`
    gives them, read once for all of them.

    For the holder of the group's lock, inside its transaction: what it reads is then exactly the group as its
    transaction leaves it, and the views can be sent instead of asking every seat to read its own. ``progress``:
    the phase's progress as the caller has just counted it under the lock, if it has (else it is counted here).
    """
    assert connection.in_atomic_block, "group_states reads a group under its lock"
    shared = phase_parts.get(group)
    params = shared.experiment.params()
    if progress is None:
        progress = progress_parts.get(group, params)
    view = _GroupView(group, params, shared, _read_rows(group, None), dict(progress))
    # Read as the transaction leaves the group: once it commits, the views that follow need not read them again.
    phase_parts.keep_on_commit(group, shared)
    progress_parts.keep_on_commit(group, view.progress)
    states = {}
    for p in shared.seats:
        if p.kind != P.Kind.HUMAN:
            continue
        p.session = group.session  # the end page's bonus
        states[str(p.pk)] = _state(p, group, p.status, shared.experiment, view if p.status == P.Status.PLAYING else None)
    return states


def own_state(p: Participant, group: Group, progress: dict[str, int], *, message: Message | None = None) -> dict[str, Any]:
    """The view of a seat that has just acted, equal to what :func:`seat_state` gives it once the action has
    committed: for the holder of the group's lock, inside its transaction, with the progress it computed.

    Within a phase, what the phase fixes is kept (or read once and kept); the seat's own rows are read here,
    except the ``message`` a candidate has just sent (in the pitch phase, their only row the view shows).
    """
    assert connection.in_atomic_block, "own_state reads a group under its lock"
    shared = phase_parts.kept(group)
    if shared is None:
        shared = _read_phase_part(group)
        phase_parts.keep_on_commit(group, shared)
    params = shared.experiment.params()
    stage = _stage(p, group)
    view = (_GroupView(group, params, shared, _read_rows(group, p, message=message), dict(progress))
            if stage == P.Status.PLAYING else None)
    return _state(p, group, stage, shared.experiment, view)


PREGAME_STAGES = frozenset({P.Status.CONSENT, P.Status.INSTRUCTIONS, P.Status.QUIZ, P.Status.DECLINED})


def pregame_state(p: Participant) -> dict[str, Any]:
    """The view of a person at consent, instructions or the quiz (or who declined), equal to what
    :func:`seat_state` gives them: built from their row with its session and experiment loaded, no query."""
    assert p.group_id is None and p.status in PREGAME_STAGES, "a view without a lobby or a group"
    return _state(p, None, p.status, p.session.experiment, None)


def lobby_states(session: Session, waiting: list[Participant]) -> dict[str, dict[str, Any]]:
    """The views of everybody waiting in the session's lobby, by participant id (as a string), each equal to what
    :func:`seat_state` gives them. For the holder of the session's lock, who has just read ``waiting``: every
    person in the lobby, in order of arrival."""
    assert connection.in_atomic_block, "lobby_states reads the lobby under the session's lock"
    states = {}
    for p in waiting:
        p.session = session
        states[str(p.pk)] = _state(p, None, P.Status.LOBBY, session.experiment, None, lobby=_lobby(p, waiting))
    return states


def _stage(p: Participant, group: Group | None, *, for_controller: bool = False) -> str:
    if (for_controller and p.is_automated and p.status == P.Status.DROPPED and group is not None
            and group.status == Group.Status.PLAYING):
        return P.Status.PLAYING
    return p.status


def _state(p: Participant, group: Group | None, stage: str, experiment: Experiment,
           view: _GroupView | None, *, lobby: dict[str, Any] | None = None) -> dict[str, Any]:
    """One seat's view; ``view``: what its group's game shows, for a seat in play; ``lobby``: what the lobby
    shows, if the caller has it."""
    params = view.params if view else experiment.params()
    state: dict[str, Any] = {
        "type": "state",
        "version": group.version if group else 0,
        "server_time": timezone.now().isoformat(),
        "stage": stage,
        "me": {"seat": p.seat, "role": p.role, "name": p.public_name,
               "colour": game.colour_of(p.seat) if p.role == P.Role.CANDIDATE else None},
        "experiment": {"rounds": params.n_rounds, "endowment": params.endowment, "multiplier": params.multiplier,
                       "message_max_chars": params.message_max_chars, "fixed_send": params.fixed_send,
                       "belief_rounds": sorted(params.belief_rounds)},
    }
    if stage == P.Status.CONSENT:
        state["consent"] = {"text": experiment.consent_text}
    elif stage == P.Status.INSTRUCTIONS:
        state["instructions"] = {"text": experiment.instructions_text.replace("{endowment}", str(params.endowment))
                                 .replace("{multiplier}", str(params.multiplier))}
    elif stage == P.Status.QUIZ:
        state["quiz"] = {"attempts": p.quiz_attempts,
                         "questions": [{"id": str(i), "question": q["question"], "options": q["options"]}
                                       for i, q in enumerate(experiment.quiz)]}
    elif stage == P.Status.LOBBY:
        state["lobby"] = lobby if lobby is not None else _lobby(p)
    elif view is not None:
        state["game"] = _game(p, view)
    elif stage == P.Status.QUESTIONNAIRE:
        state["questionnaire"] = {"questions": QUESTIONS}
    else:
        state["end"] = _end(p)
    return state


# ---- the parts of a game view that every seat of a group shares ----------------------------------------------
# At a phase change every person in the group asks for a new state at once, and their connections may sit in
# the same web process. What all seats see alike is read once and kept, per process, for the seats that ask
# after it, in two parts that change at different speeds:
# - what is fixed for a whole phase (the experiment, the seats, the round's messages once the pitch phase is
#   over, the public tally): kept per (group, round, phase);
# - the phase's progress, which every action changes: kept per group *version* (``Group.version`` goes up with
#   every change anyone in the group can see, under the group's lock).
# Rows are read after the group row they are keyed on, so a kept part is never older than its key.


@dataclass(frozen=True)
class PhasePart:
    experiment: Experiment
    policy: game.LabelPolicy
    seats: list[Participant]
    messages: dict[int, Message] | None  # None during the pitch phase: nobody sees another's message yet
    tally: dict[str, int] | None


@dataclass(frozen=True)
class _Rows:
    """The decisions a game view shows to their owners: the whole group's, or one seat's."""
    choices: list[Choice]  # with ``return_decision``; a selector's of every round, a candidate's of this round
    beliefs: list[Belief]  # this round's (belief phase only)
    messages: dict[int, Message]  # this round's, by candidate id (pitch phase only)
    payoffs: dict[int, int]  # this round's points, by participant id (feedback and belief phases only)


@dataclass(frozen=True)
class _GroupView:
    group: Group
    params: game.Params
    shared: PhasePart
    rows: _Rows
    progress: dict[str, int]


def _read_rows(group: Group, p: Participant | None, *, message: Message | None = None) -> _Rows:
    """The rows behind the game views of ``p`` (or, with None, of every seat of the group): the same queries,
    filtered to one seat or not. A kind of row the phase does not show is not asked for: even an empty
    (``.none()``) queryset costs most of a query's compilation, and a view needs one or two of the four kinds.
    ``message``: the candidate ``p``'s message of the round, if the caller has just stored it (not read again)."""
    r, phase = group.round_number, Phase(group.phase)
    selector = p is None or p.role == P.Role.SELECTOR
    candidate = p is None or p.role == P.Role.CANDIDATE
    # .order_by(): the models' default orderings join other tables; these rows are keyed or sorted here.
    choices: list[Choice] = []
    if selector:  # every round: a selector's history with each candidate
        query = Choice.objects.filter(group=group, **({"selector": p} if p else {}))
        choices = list(query.select_related("return_decision").order_by())
    elif phase in (Phase.RETURN, Phase.FEEDBACK, Phase.BELIEF):  # who chose the candidate this round
        choices = list(Choice.objects.filter(group=group, round_number=r, candidate=p).select_related("return_decision")
                       .order_by())
    beliefs: list[Belief] = []
    if selector and phase == Phase.BELIEF:
        beliefs = list(Belief.objects.filter(group=group, round_number=r, **({"selector": p} if p else {})).order_by())
    messages: dict[int, Message] = {}
    if candidate and phase == Phase.PITCH and message is not None:
        assert p is not None and (message.candidate_id, message.round_number) == (p.pk, r), "not the seat's message"
        messages = {p.pk: message}
    elif candidate and phase == Phase.PITCH:  # later, every seat sees the round's messages (kept per phase)
        messages = {m.candidate_id: m for m in Message.objects.filter(group=group, round_number=r,
                                                                       **({"candidate": p} if p else {})).order_by()}
    payoffs: dict[int, int] = {}
    if phase in (Phase.FEEDBACK, Phase.BELIEF):
        payoffs = dict(RoundPayoff.objects.filter(round_number=r, **({"participant": p} if p else {"participant__group": group}))
                       .order_by().values_list("participant_id", "points"))
    return _Rows(choices=choices, beliefs=beliefs, messages=messages, payoffs=payoffs)


class _Kept(Generic[T]):
    """Values read once per key and kept per process (least recently used go first).

    Seats asking for a key that is being read wait for that one read. Inside a transaction the rows may be the
    transaction's own, uncommitted: read, never keep.
    """

    SIZE = 512  # only each group's newest key is asked for; the rest age out

    def __init__(self, read: Callable[..., T], key: Callable[[Group], tuple[Any, ...]]) -> None:
        self._read, self._key = read, key
        self._kept: OrderedDict[tuple[Any, ...], T] = OrderedDict()
        self._reading: dict[tuple[Any, ...], concurrent.futures.Future[T]] = {}
        self._lock = threading.Lock()

    def get(self, group: Group, *args: Any) -> T:
        """The value for the group as it is now; ``args`` go to the read function."""
        if connection.in_atomic_block:
            return self._read(group, *args)
        key = self._full_key(group)
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
            reading = self._reading.get(key)
            mine = reading is None
            if mine:
                reading = self._reading[key] = concurrent.futures.Future()
        if not mine:
            try:
                return reading.result(timeout=5)
            except Exception:
                return self._read(group, *args)
        try:
            value = self._read(group, *args)
        except BaseException as exc:
            with self._lock:
                self._reading.pop(key, None)
            reading.set_exception(exc)
            raise
        self._keep(key, value)
        with self._lock:
            self._reading.pop(key, None)
        reading.set_result(value)
        return value

    def kept(self, group: Group) -> T | None:
        """The value kept for the group as it is now, if any (never read). Also inside a transaction: a value kept
        for a key was committed at that key, and is the caller's to use only while the key holds."""
        with self._lock:
            return self._kept.get(self._full_key(group))

    def keep_on_commit(self, group: Group, value: T) -> None:
        """Keep ``value`` for the group as it is now, once the current transaction commits: a writer that holds
        the group's lock may know a part already, and save the next reader a read."""
        transaction.on_commit(functools.partial(self._keep, self._full_key(group), value))

    def _full_key(self, group: Group) -> tuple[Any, ...]:
        # created_at: a database that was reset while a web process ran may give a new group an old id.
        return (group.pk, group.created_at, *self._key(group))

    def _keep(self, key: tuple[Any, ...], value: T) -> None:
        with self._lock:
            self._kept[key] = value
            self._kept.move_to_end(key)
            while len(self._kept) > self.SIZE:
                self._kept.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()


def _read_phase_part(group: Group) -> PhasePart:
    g = group
    if not (Group.session.is_cached(g) and Session.experiment.is_cached(g.session) and Group.condition.is_cached(g)):
        g = Group.objects.select_related("session__experiment", "condition").get(pk=group.pk)
    experiment = g.session.experiment
    r, phase = group.round_number, Phase(group.phase)
    # .order_by(): the models' default orderings join other tables; these rows are keyed or sorted here.
    seats = list(group.participants.order_by())
    tally = None
    if phase in (Phase.FEEDBACK, Phase.BELIEF) and experiment.show_public_tally:
        tally = dict.fromkeys(sorted(s.seat for s in seats if s.role == P.Role.CANDIDATE), 0)
        for seat in Choice.objects.filter(group=group, round_number=r, candidate__isnull=False).values_list(
                "candidate__seat", flat=True):
            tally[seat] += 1
    messages = None
    if phase != Phase.PITCH:
        messages = {m.candidate_id: m for m in Message.objects.filter(group=group, round_number=r).order_by()}
    return PhasePart(experiment=experiment, policy=g.condition.label_policy(), seats=seats, messages=messages,
                     tally=tally)


# The lambdas look the read functions up when called (tests replace them).
phase_parts: _Kept[PhasePart] = _Kept(lambda g: _read_phase_part(g), key=lambda g: (g.round_number, g.phase))
progress_parts: _Kept[dict[str, int]] = _Kept(lambda g, params: services.progress(g, params), key=lambda g: (g.version,))


def clear_kept() -> None:
    """Forget every kept part (tests: a new database may reuse ids and creation times)."""
    phase_parts.clear()
    progress_parts.clear()


def _lobby(p: Participant, waiting_people: list[Participant] | None = None) -> dict[str, Any]:
    """``waiting_people``: everybody in the lobby in order of arrival, if the caller has read them."""
    experiment = p.session.experiment
    in_lobby = p.session.participants.filter(status=P.Status.LOBBY, controller=P.Controller.PERSON)
    waiting = in_lobby.count() if waiting_people is None else len(waiting_people)
    needed = experiment.n_humans
    ahead = waiting % needed or needed
    lobby = {"waiting": waiting, "group_size": needed, "missing": max(0, needed - ahead),
             "timeout_at": (p.lobby_at + timezone.timedelta(seconds=experiment.lobby_timeout_seconds)).isoformat()
             if p.lobby_at else None, "fill_at": None}
    if p.session.synthetic_fill_after is not None and p.lobby_at:
        if waiting_people is None:
            first = in_lobby.order_by("lobby_at").values_list("lobby_at", flat=True).first() or p.lobby_at
        else:
            first = waiting_people[0].lobby_at if waiting_people else p.lobby_at
        lobby["fill_at"] = (first + timezone.timedelta(seconds=p.session.synthetic_fill_after)).isoformat()
    return lobby


def _end(p: Participant) -> dict[str, Any]:
    experiment = p.session.experiment
    code = {P.Status.FINISHED: experiment.completion_code, P.Status.LOBBY_TIMEOUT: experiment.lobby_timeout_code,
            P.Status.DROPPED: experiment.dropout_code}.get(p.status, "")
    return {"reason": p.status, "payoff": p.payoff, "bonus": str(services.bonus_of(p)), "currency": experiment.currency,
            "participation_fee": str(experiment.participation_fee), "completion_code": code,
            "redirect_url": _redirect_for(experiment.completion_redirect_url, experiment.completion_code, code)}


def _redirect_for(url: str, completion_code: str, code: str) -> str:
    """The redirect for this outcome. A URL that carries the completion code (Prolific's ``?cc=…``) gets
    the outcome's own code instead, so that nobody who did not finish is reported as complete."""
    if not url or not code:
        return ""
    if code == completion_code:
        return url
    return url.replace(completion_code, code) if completion_code and completion_code in url else ""


def _game(p: Participant, view: _GroupView) -> dict[str, Any]:
    group, params, shared, rows = view.group, view.params, view.shared, view.rows
    r, phase = group.round_number, Phase(group.phase)
    by_id = {s.pk: s for s in shared.seats}
    candidates = sorted((s for s in shared.seats if s.role == P.Role.CANDIDATE), key=lambda s: s.seat)
    policy = shared.policy
    g: dict[str, Any] = {
        "round": r, "rounds": params.n_rounds, "phase": str(phase),
        "deadline": group.phase_deadline.isoformat() if group.phase_deadline else None,
        "phase_started": group.phase_started_at.isoformat() if group.phase_started_at else None,
        "progress": dict(view.progress),
        "paused": group.paused_at is not None,
        "payoff_total": p.payoff,
        "todo": False,
    }
    show_messages = shared.messages is not None
    messages = shared.messages or {}

    def card(c: Participant) -> dict[str, Any]:
        m = messages.get(c.pk)
        return {"seat": c.seat, "name": c.public_name, "colour": game.colour_of(c.seat),
                "label": game.identity_label(policy, r, c.kind == P.Kind.BOT),
                "message": (m.text if m else "") if show_messages else None}

    def returned(c: Choice) -> int | None:
        return c.return_decision.returned if hasattr(c, "return_decision") else None

    def seat_of(participant_id: int | None) -> str | None:
        return by_id[participant_id].seat if participant_id else None

    if p.role == P.Role.SELECTOR:
        mine = {c.round_number: c for c in rows.choices if c.selector_id == p.pk}
        history: dict[str, dict[str, Any]] = defaultdict(lambda: {"rounds": [], "sent": 0, "returned": 0})
        for rn, c in sorted(mine.items()):
            if c.candidate_id and (rn < r or phase in (Phase.FEEDBACK, Phase.BELIEF)):
                h = history[seat_of(c.candidate_id)]
                h["rounds"].append(rn)
                h["sent"] += c.sent
                h["returned"] += returned(c) or 0
        order = game.candidate_order(group.seed, p.seat, r, [c.seat for c in candidates])
        by_seat = {c.seat: c for c in candidates}
        g["candidates"] = [{**card(by_seat[s]), "position": i + 1,
                            "history": history.get(s, {"rounds": [], "sent": 0, "returned": 0})}
                           for i, s in enumerate(order)]
        choice = mine.get(r)
        g["my_choice"] = ({"candidate": seat_of(choice.candidate_id), "sent": choice.sent,
                           "timed_out": choice.timed_out} if choice else None)
        if phase == Phase.CHOICE:
            g["todo"] = choice is None
        if phase in (Phase.FEEDBACK, Phase.BELIEF) and choice is not None:
            back = returned(choice) if choice.candidate_id else 0
            g["feedback"] = {"candidate": seat_of(choice.candidate_id), "sent": choice.sent,
                             "multiplied": choice.multiplied, "returned": back,
                             "payoff": game.selector_payoff(choice.sent, back, params)}
        if phase == Phase.BELIEF:
            given = {b.candidate_id: b for b in rows.beliefs if b.selector_id == p.pk}
            g["beliefs"] = {by_id[cid].seat: {"guess": b.guess, "confidence": b.confidence} for cid, b in given.items()}
            g["todo"] = len(given) < len(candidates)
    else:
        g["candidates"] = [card(c) for c in candidates]
        # During the pitch phase only their own message, which they may have just sent.
        mine_msg = messages.get(p.pk) if show_messages else rows.messages.get(p.pk)
        g["my_message"] = {"text": mine_msg.text, "timed_out": mine_msg.timed_out} if mine_msg else None
        if phase == Phase.PITCH:
            g["todo"] = mine_msg is None
        if phase in (Phase.RETURN, Phase.FEEDBACK, Phase.BELIEF):
            chosen_by = sorted((c for c in rows.choices if c.round_number == r and c.candidate_id == p.pk),
                               key=lambda c: by_id[c.selector_id].seat)
            g["to_return"] = [{"selector": by_id[c.selector_id].seat, "name": by_id[c.selector_id].public_name,
                               "sent": c.sent, "multiplied": c.multiplied, "returned": returned(c)}
                              for c in chosen_by]
            if phase == Phase.RETURN:
                g["todo"] = any(t["returned"] is None for t in g["to_return"])
            else:
                g["feedback"] = {"earned": sum(t["multiplied"] - (t["returned"] or 0) for t in g["to_return"])
                                 if g["to_return"] else params.unchosen_base}
    if phase in (Phase.FEEDBACK, Phase.BELIEF):
        g.setdefault("feedback", {})["round_payoff"] = rows.payoffs.get(p.pk)
        if shared.tally is not None:
            g["tally"] = dict(shared.tally)
    return g
