"""Replay a finished session from its seed, its frozen design and its recorded inputs, and compare.

The replay runs inside one database transaction that is always rolled back: the session's derived rows
(groups, seats, decisions, payoffs, events) are set aside, the experiment's design is put back as it was frozen
(``Session.design``), and every recorded input is fed again, in the order of the event log, through the same
services a live session uses, with the clock set to the input's recorded server time. Deadlines and lobby
timeouts are not read from the log: a phase the log says closed on its own is closed by the deadline rule,
which re-derives the defaults. Automated seats (scripted bots, synthetic humans, language models) are not
asked again: their recorded decisions are inputs, like people's. When the transaction is rolled back nothing
of the replay remains; a reader in another connection never sees it.

What is compared: every exported table of the session (``experiment.export``), row by row, every column but
the ids (they are new rows), and the wall-clock columns within :data:`CLOCK_TOLERANCE` (the replay's clock is
the recorded time of each input, the live server's was a few microseconds earlier); the event log stream by
stream (per group, per person before their group, the session's own), type, round, phase and payload. Not
compared: the LLM call log, which is an input (its bundle file is checked by its hash), connection events
(they record the network, and no rule reads them) and the bots' own bookkeeping events.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from unittest import mock

from django.apps import apps
from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from experiment import design, export, services
from experiment.game import RuleError
from experiment.models import (
    Condition,
    Event,
    Experiment,
    Group,
    Message,
    Participant,
    QuestionnaireResponse,
    Session,
)

logger = logging.getLogger(__name__)
P = Participant

# The live server reads its clock when an action starts, the log stamps the action a little later; the replay
# stamps both with the log's time. Every wall-clock value agrees within this (checked, not assumed).
CLOCK_TOLERANCE = timedelta(milliseconds=export.REPLAY_CLOCK_TOLERANCE_MS)

# Events not replayed and not compared, with the reason (docs/replay.md).
NOT_COMPARED = {
    "participant.connected": "records the network; no rule reads it",
    "participant.disconnected": "records the network; no rule reads it",
    "bot.rejected": "the bots' own bookkeeping; their decisions are replayed as recorded",
    "bot.fallback": "the bots' own bookkeeping; their decisions are replayed as recorded",
    "bot.late": "the bots' own bookkeeping; their decisions are replayed as recorded",
    "automation.rejected": "the bots' own bookkeeping; their decisions are replayed as recorded",
}
# The LLM call log, named rather than imported (experiment does not import the bots app).
LLM_CALL_MODEL = ("bots", "LLMCall")

# Table columns that hold wall-clock values: compared within CLOCK_TOLERANCE.
CLOCK_COLUMNS = frozenset(export.REPLAY_CLOCK_COLUMNS)
# Payload keys that hold wall-clock values.
CLOCK_KEYS = frozenset({"deadline", "seconds", "remaining_seconds", "paused_seconds"})
# Tables compared row by row (events are compared stream by stream; the LLM call log is an input).
TABLES = tuple(t.name for t in export.TABLES if t.name not in export.REPLAY_NOT_REPLAYED)
is_id_column = export.replay_id_column


class ReplayError(RuntimeError):
    """The session cannot be replayed (not found, not finished, no frozen design)."""


@dataclass
class Difference:
    table: str
    where: str
    column: str
    stored: Any
    replayed: Any

    def __str__(self) -> str:
        column = f", column {self.column}" if self.column else ""
        return f"{self.table}: {self.where}{column}: stored {self.stored!r}, replayed {self.replayed!r}"


@dataclass
class Result:
    session_id: int
    groups: int = 0
    inputs: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # inputs the replay's rules refused
    design_sha256: str = ""
    replayed_design_sha256: str = ""

    @property
    def identical(self) -> bool:
        return not self.differences and not self.refused and self.design_sha256 == self.replayed_design_sha256

    def as_dict(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "identical": self.identical, "groups": self.groups,
                "inputs": self.inputs, "rows": self.rows, "design_sha256": self.design_sha256,
                "replayed_design_sha256": self.replayed_design_sha256, "refused": self.refused,
                "differences": [d.__dict__ | {"text": str(d)} for d in self.differences]}


class _Rollback(Exception):
    pass


class _Clock:
    def __init__(self) -> None:
        self.now: datetime = timezone.now()

    def __call__(self) -> datetime:
        return self.now


# ---- what was recorded ------------------------------------------------------------------------------

@dataclass
class _Recorded:
    """Everything the replay needs, read before the session's rows are set aside."""

    session: Session
    events: list[Event]
    people: list[Participant]  # in join order
    key_of: dict[int, tuple]  # participant id -> a key that names the same seat in the replay
    texts: dict[tuple[int, int, str], str]  # (group number, round, seat) -> the pitch as stored
    questionnaires: dict[int, dict[str, Any]]  # participant id -> answers
    controllers: dict[int, str]  # group number -> who played its bot seats
    deadlines: dict[tuple[int, int, str], datetime]  # (group number, round, phase) -> the last deadline logged
    # (participant id, round, phase) -> the protocol messages parsed from the model's applied reply
    model_actions: dict[tuple[int, int, str], list[dict[str, Any]]]
    tables: dict[str, tuple[list[str], list[tuple]]]
    streams: dict[tuple, list[tuple]]


def _seat_keys(session_id: int, persons: dict[int, tuple]) -> dict[int, tuple]:
    """``persons`` (participant id -> ("person", join index)) with every other seated participant keyed by its
    group number and seat: keys that name the same seat in the stored session and in its replay."""
    keys = dict(persons)
    for pk, number, seat in (Participant.objects.filter(session_id=session_id, group__isnull=False)
                             .exclude(pk__in=list(keys)).values_list("pk", "group__number", "seat")):
        keys[pk] = ("seat", number, seat)
    return keys


def _stored_tables(session_id: int) -> dict[str, tuple[list[str], list[tuple]]]:
    scope, options = export.Scope(session_ids=(session_id,), label=f"session-{session_id}"), export.Options(
        recruitment="include")
    out = {}
    for name in TABLES:
        t = export.table(name)
        names = [c.name for c in export.columns_of(t, options)]
        out[name] = (names, list(export.rows(t, scope=scope, options=options)))
    return out


def _streams(session_id: int, key_of: Callable[[int | None], Any]) -> dict[tuple, list[tuple]]:
    """The event log split into streams whose order the rules fix: one per group, one per person before their
    group, the session's own. Each event as (type, round, phase, who, payload with participant ids as keys)."""
    streams: dict[tuple, list[tuple]] = defaultdict(list)
    for e in (Event.objects.filter(session_id=session_id).exclude(type__in=list(NOT_COMPARED))
              .select_related("group", "participant").order_by("id")):
        if e.group_id is not None:
            stream: tuple = ("group", e.group.number)
        elif e.participant_id is not None:
            stream = ("person", key_of(e.participant_id))
        else:
            stream = ("session",)
        payload = _payload_keys(e.payload, key_of)
        streams[stream].append((e.type, e.round_number, e.phase, key_of(e.participant_id), e.actor_id, payload))
    return dict(streams)


def _payload_keys(payload: Any, key_of: Callable[[int | None], Any]) -> Any:
    if isinstance(payload, dict):
        return {k: (key_of(v) if k == "participant" and isinstance(v, int) else _payload_keys(v, key_of))
                for k, v in payload.items()}
    if isinstance(payload, list):
        return [_payload_keys(v, key_of) for v in payload]
    return payload


def _record(session: Session) -> _Recorded:
    events = list(Event.objects.filter(session=session).select_related("group", "participant").order_by("id"))
    joined = [e.participant_id for e in events if e.type == "participant.joined"]
    by_pk = {p.pk: p for p in session.participants.filter(pk__in=joined)}
    people = [by_pk[pk] for pk in joined if pk in by_pk]
    key_of = _seat_keys(session.pk, {p.pk: ("person", i) for i, p in enumerate(people)})
    texts = {(n, r, s): t for n, r, s, t in Message.objects.filter(group__session=session, timed_out=False)
             .values_list("group__number", "round_number", "candidate__seat", "text")}
    questionnaires = dict(QuestionnaireResponse.objects.filter(participant__session=session)
                          .values_list("participant_id", "answers"))
    controllers: dict[int, str] = {}
    deadlines: dict[tuple[int, int, str], datetime] = {}
    for e in events:
        if e.type == "group.formed":
            bots = [s["controller"] for s in e.payload.get("seats", {}).values() if s.get("kind") == P.Kind.BOT]
            if bots:
                controllers[e.group.number] = bots[0]
        elif e.type in ("phase.started", "group.resumed") and e.payload.get("deadline"):
            deadlines[(e.group.number, e.round_number, e.phase)] = parse_datetime(e.payload["deadline"])
    return _Recorded(session=session, events=events, people=people, key_of=key_of, texts=texts,
                     questionnaires=questionnaires, controllers=controllers, deadlines=deadlines,
                     model_actions=_model_actions(session),
                     tables=_stored_tables(session.pk),
                     streams=_streams(session.pk, lambda pk: key_of.get(pk) if pk is not None else None))


def _model_actions(session: Session) -> dict[tuple[int, int, str], list[dict[str, Any]]]:
    """What each language-model seat's applied reply said, as parsed when it came (the LLM call log)."""
    try:
        calls = apps.get_model(*LLM_CALL_MODEL)
    except LookupError:
        return {}
    out: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for pk, r, phase, parsed in (calls.objects.filter(session=session, applied=True, participant__isnull=False)
                                 .order_by("id").values_list("participant_id", "round_number", "phase", "parsed")):
        if isinstance(parsed, list):
            out[(pk, r, phase)] = parsed
    return out


# ---- the scratch copy -------------------------------------------------------------------------------

def _restore_design(session: Session) -> None:
    """Put the experiment, its conditions and their bot profiles back as they were frozen (inside the
    rolled-back transaction only). Conditions added since are moved to a throwaway experiment."""
    frozen = session.design
    experiment = frozen["experiment"]
    Experiment.objects.filter(pk=session.experiment_id).update(**{k: v for k, v in experiment.items() if k != "id"})
    kept = []
    profile_model = Condition._meta.get_field("bot_profile").related_model
    for entry in frozen["conditions"]:
        values = {k: v for k, v in entry.items() if k not in ("id", "bot_profile")}
        profile = entry.get("bot_profile")
        if profile is not None:
            fields = {k: v for k, v in profile.items() if k != "id"}
            if not profile_model.objects.filter(pk=profile["id"]).update(**fields):
                profile_model.objects.create(id=profile["id"], **fields)
        if not Condition.objects.filter(pk=entry["id"]).update(experiment_id=session.experiment_id, **values):
            Condition.objects.create(id=entry["id"], experiment_id=session.experiment_id, **values)
        kept.append(entry["id"])
    extra = Condition.objects.filter(experiment_id=session.experiment_id).exclude(pk__in=kept)
    if extra.exists():
        aside = Experiment.objects.create(name="replay: conditions added after the start",
                                          slug=f"replay-aside-{session.pk}-{timezone.now():%H%M%S%f}")
        extra.update(experiment=aside)


def _initial_status(events: list[Event], session: Session) -> str:
    for e in events:
        if e.type == "session.status_changed":
            return e.payload["from"]
    return Session.Status.OPEN if session.ended_at is not None else session.status


def _set_aside(recorded: _Recorded) -> None:
    session = recorded.session
    Event.objects.filter(session=session).delete()
    session.participants.all().delete()
    session.groups.all().delete()
    Session.objects.filter(pk=session.pk).update(status=_initial_status(recorded.events, session), ended_at=None,
                                                 design=None, design_frozen_at=None)


# ---- feeding the inputs -------------------------------------------------------------------------------

class _Replayer:
    def __init__(self, recorded: _Recorded, clock: _Clock, result: Result) -> None:
        self.r, self.clock, self.result = recorded, clock, result
        self.session_id = recorded.session.pk
        self.new_of: dict[tuple, int] = {}  # participant key -> replay participant id
        self.joins = 0

    def participant(self, original_id: int | None) -> Participant:
        key = self.r.key_of.get(original_id)
        if key is None:
            raise RuleError("unknown_participant", f"participant {original_id} of the log has no seat in the replay")
        if key[0] == "seat" and key not in self.new_of:
            found = (Participant.objects.filter(session_id=self.session_id, group__number=key[1], seat=key[2])
                     .values_list("pk", flat=True).first())
            if found is None:
                raise RuleError("unknown_participant", f"seat {key[2]} of group {key[1]} was never formed in the replay")
            self.new_of[key] = found
        return Participant.objects.get(pk=self.new_of[key])

    def group(self, number: int) -> Group | None:
        return Group.objects.filter(session_id=self.session_id, number=number).first()

    def controller_of(self, group: Group) -> str:
        return self.r.controllers.get(group.number, P.Controller.SCRIPTED)

    def run(self) -> None:
        for e in self.r.events:
            handler = getattr(self, "on_" + e.type.replace(".", "_"), None)
            if handler is None:
                continue
            self.clock.now = e.created_at
            self.result.inputs += 1
            try:
                handler(e)
            except RuleError as exc:
                self.result.refused.append(f"event {e.pk} ({e.type} at {e.created_at.isoformat()}): refused with "
                                           f"{exc.code}: {exc}")

    # -- before the game
    def on_participant_joined(self, e: Event) -> None:
        original = self.r.people[self.joins]
        self.joins += 1
        p = services.participant_join(session_id=self.session_id, prolific_pid=original.prolific_pid,
                                      study_id=original.study_id, recruitment_session_id=original.recruitment_session_id)
        self.new_of[self.r.key_of[original.pk]] = p.pk

    def on_consent_given(self, e: Event) -> None:
        services.consent_submit(participant_id=self.participant(e.participant_id).pk, accept=True)

    def on_consent_declined(self, e: Event) -> None:
        services.consent_submit(participant_id=self.participant(e.participant_id).pk, accept=False)

    def on_instructions_read(self, e: Event) -> None:
        services.instructions_done(participant_id=self.participant(e.participant_id).pk)

    def on_quiz_submitted(self, e: Event) -> None:
        services.quiz_submit(participant_id=self.participant(e.participant_id).pk, answers=e.payload["answers"])

    def on_lobby_timeout(self, e: Event) -> None:
        if self.participant(e.participant_id).status == P.Status.LOBBY:
            services.lobby_sweep(session_id=self.session_id, now=e.created_at)

    def on_society_started(self, e: Event) -> None:
        services.society_start(session_id=self.session_id, groups=e.payload["groups"], condition=e.payload["condition"],
                               actor_id=e.actor_id)

    def on_group_formed(self, e: Event) -> None:
        if self.group(e.group.number) is None:  # formed by the lobby's clock (synthetic fill), not by an arrival
            services.lobby_sweep(session_id=self.session_id, now=e.created_at)

    # -- the game: decisions as recorded, deadlines by the rules
    def _model_said(self, e: Event, p: Participant, type: str, **match: Any) -> dict[str, Any] | None:
        """For a seat a language model played: the action its logged, applied reply holds (None for other seats).
        A model seat whose reply is missing from the log is refused, not silently replayed from the event."""
        if p.controller != P.Controller.LLM:
            return None
        for action in self.r.model_actions.get((e.participant_id, e.round_number, e.phase), []):
            if action.get("type") == type and all(action.get(k) == v for k, v in match.items()):
                return action
        raise RuleError("no_model_reply", f"the model's applied reply for {e.type} of seat {p.seat} in round "
                                          f"{e.round_number} is not in the LLM call log")

    def on_pitch_submitted(self, e: Event) -> None:
        p = self.participant(e.participant_id)
        said = self._model_said(e, p, "pitch.submit")
        text = said.get("text") if said else self.r.texts.get((e.group.number, e.round_number, e.participant.seat), "")
        services.pitch_submit(participant_id=p.pk, round_number=e.round_number, text=text, automated=p.is_automated)

    def on_choice_submitted(self, e: Event) -> None:
        p = self.participant(e.participant_id)
        said = self._model_said(e, p, "choice.submit") or {"candidate": e.payload["candidate"], "amount": e.payload["sent"]}
        services.choice_submit(participant_id=p.pk, round_number=e.round_number, candidate=said.get("candidate"),
                               amount=said.get("amount"), automated=p.is_automated)

    def on_return_submitted(self, e: Event) -> None:
        p = self.participant(e.participant_id)
        said = (self._model_said(e, p, "return.submit", selector=e.payload["selector"])
                or {"selector": e.payload["selector"], "amount": e.payload["returned"]})
        services.return_submit(participant_id=p.pk, round_number=e.round_number, selector=said.get("selector"),
                               amount=said.get("amount"), automated=p.is_automated)

    def on_belief_submitted(self, e: Event) -> None:
        p = self.participant(e.participant_id)
        said = self._model_said(e, p, "belief.submit")
        beliefs = said.get("beliefs") if said else {seat: {"guess": guess, "confidence": confidence}
                                                   for seat, (guess, confidence) in e.payload["beliefs"].items()}
        services.belief_submit(participant_id=p.pk, round_number=e.round_number, beliefs=beliefs,
                               automated=p.is_automated)

    def on_phase_closed(self, e: Event) -> None:
        group = self.group(e.group.number)
        if group is None or group.status != Group.Status.PLAYING or group.paused_at is not None:
            return
        if (group.round_number, group.phase) != (e.round_number, e.phase):
            return  # closed already in the replay: by its last decision, or by staff
        deadline = self.r.deadlines.get((e.group.number, e.round_number, e.phase))
        if deadline is None or e.created_at < deadline:
            return  # the log's phase did not close on its clock: the replay's differences will say why
        self.clock.now = max(e.created_at, group.phase_deadline or e.created_at)
        services.phase_close(group_id=group.pk, round_number=e.round_number, phase=e.phase, reason="deadline")

    def on_questionnaire_submitted(self, e: Event) -> None:
        services.questionnaire_submit(participant_id=self.participant(e.participant_id).pk,
                                      answers=self.r.questionnaires.get(e.participant_id, {}))

    # -- the experimenter's actions (the cockpit), with the same staff user as actor
    def on_group_paused(self, e: Event) -> None:
        services.group_pause(group_id=self.group(e.group.number).pk, actor_id=e.actor_id)

    def on_group_resumed(self, e: Event) -> None:
        services.group_resume(group_id=self.group(e.group.number).pk, actor_id=e.actor_id)

    def on_phase_closed_by_staff(self, e: Event) -> None:
        services.group_phase_close_now(group_id=self.group(e.group.number).pk, actor_id=e.actor_id)

    def on_participant_removed(self, e: Event) -> None:
        services.participant_remove(participant_id=self.participant(e.participant_id).pk, actor_id=e.actor_id,
                                    replace_with_bot=bool(e.payload.get("replaced_with_bot")))

    def on_session_ended(self, e: Event) -> None:
        services.session_end(session_id=self.session_id, actor_id=e.actor_id)

    def on_session_status_changed(self, e: Event) -> None:
        services.session_status_set(session_id=self.session_id, status=e.payload["to"], actor_id=e.actor_id)


# ---- comparing -------------------------------------------------------------------------------------------

def _as_time(value: Any) -> datetime | float | None:
    if isinstance(value, datetime | float | int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        return parse_datetime(value)
    return None


def _close(a: Any, b: Any) -> bool:
    if a == b:
        return True
    x, y = _as_time(a), _as_time(b)
    if isinstance(x, datetime) and isinstance(y, datetime):
        return abs(x - y) <= CLOCK_TOLERANCE
    if isinstance(x, int | float) and isinstance(y, int | float):
        return abs(x - y) <= CLOCK_TOLERANCE.total_seconds()
    return False


def _where(names: list[str], row: tuple, index: int) -> str:
    picked = [f"{n} {row[names.index(n)]}" for n in ("group_number", "round", "seat", "selector_seat",
                                                     "candidate_seat") if n in names]
    return f"row {index + 1} (" + ", ".join(picked) + ")" if picked else f"row {index + 1}"


def compare_tables(stored: dict[str, tuple[list[str], list[tuple]]],
                   replayed: dict[str, tuple[list[str], list[tuple]]]) -> Iterator[Difference]:
    for name, (names, rows) in stored.items():
        names_b, rows_b = replayed[name]
        if names != names_b:
            yield Difference(name, "columns", "", names, names_b)
            continue
        if len(rows) != len(rows_b):
            yield Difference(name, "row count", "", len(rows), len(rows_b))
        for i, (a, b) in enumerate(zip(rows, rows_b, strict=False)):  # (counts compared above)
            for column, x, y in zip(names, a, b, strict=True):
                if is_id_column(column):
                    continue
                if x != y and not (column in CLOCK_COLUMNS and _close(x, y)):
                    yield Difference(name, _where(names, a, i), column, x, y)


def _same_payload(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(
            _close(a[k], b[k]) if k in CLOCK_KEYS else _same_payload(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_payload(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def compare_streams(stored: dict[tuple, list[tuple]], replayed: dict[tuple, list[tuple]]) -> Iterator[Difference]:
    labels = ("type", "round", "phase", "participant", "actor", "payload")
    for stream in sorted(set(stored) | set(replayed), key=repr):
        a, b = stored.get(stream, []), replayed.get(stream, [])
        where = " ".join(str(s) for s in stream)
        for i, (x, y) in enumerate(zip(a, b, strict=False)):  # (counts compared below)
            for label, u, v in zip(labels, x, y, strict=True):
                if not (_same_payload(u, v) if label == "payload" else u == v):
                    yield Difference("events", f"{where}, event {i + 1} ({x[0]})", label, u, v)
                    break
        if len(a) != len(b):
            extra = (a if len(a) > len(b) else b)[min(len(a), len(b))]
            yield Difference("events", f"{where}, event {min(len(a), len(b)) + 1}", "count",
                             f"{len(a)} events" + (f", next {extra[0]}" if len(a) > len(b) else ""),
                             f"{len(b)} events" + (f", next {extra[0]}" if len(b) > len(a) else ""))


# ---- the whole --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _replay_environment(clock: _Clock, replayer_ref: list[_Replayer]) -> Iterator[None]:
    # Bot seats are seated with the controller the log recorded (whether a model key was set is the live
    # machine's fact, not the replaying one's). The bots app is reached by name: experiment does not import it.
    patches = [mock.patch("django.utils.timezone.now", clock),
               mock.patch("bots.automation.bot_controller", lambda group: replayer_ref[0].controller_of(group))]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def replay(session_id: int) -> Result:
    """Replay a finished session and compare it with what is stored. Changes nothing."""
    session = Session.objects.select_related("experiment").filter(pk=session_id).first()
    if session is None:
        raise ReplayError(f"No session with id {session_id}.")
    if session.design is None:
        raise ReplayError(f"Session {session_id} has no frozen design: nobody joined it, or it was played before "
                          "designs were frozen (see docs/replay.md).")
    if session.groups.filter(status=Group.Status.PLAYING).exists():
        raise ReplayError(f"Session {session_id} still has groups playing: replay a finished session (or end it).")
    result = Result(session_id=session_id, design_sha256=design.digest(session.design))
    try:
        with transaction.atomic():
            recorded = _record(session)
            result.groups = session.groups.count()
            result.rows = {name: len(rows) for name, (_, rows) in recorded.tables.items()}
            clock = _Clock()
            ref: list[_Replayer] = []
            with _replay_environment(clock, ref):
                _restore_design(session)
                _set_aside(recorded)
                replayer = _Replayer(recorded, clock, result)
                ref.append(replayer)
                replayer.run()
            replayed_session = Session.objects.get(pk=session_id)
            result.replayed_design_sha256 = (design.digest(replayed_session.design)
                                             if replayed_session.design is not None else "")
            key_of = _seat_keys(session_id, {pk: key for key, pk in replayer.new_of.items() if key[0] == "person"})
            result.differences.extend(compare_tables(recorded.tables, _stored_tables(session_id)))
            result.differences.extend(compare_streams(
                recorded.streams, _streams(session_id, lambda pk: key_of.get(pk) if pk is not None else None)))
            raise _Rollback
    except _Rollback:
        pass
    return result


# ---- a bundle against the database -------------------------------------------------------------------------

def _scope_of(label: str) -> export.Scope:
    if label == "all":
        return export.Scope.everything()
    if label.startswith("session-") and label[len("session-"):].isdigit():
        return export.Scope.session(int(label[len("session-"):]))
    if label.startswith("experiment-"):
        return export.Scope.experiment(label[len("experiment-"):])
    raise export.ExportError(f'The bundle\'s scope "{label}" names several sessions by count only; export the '
                             "session (or its experiment) again to check it against the database.")


def bundle_problems(path: Any, *, session_id: int, manifest_sha256: str = "") -> list[str]:
    """Check a bundle against its manifest (every file intact), then against the database: every table file
    must be what the database exports now, byte for byte, and the session's design hash what it froze."""
    manifest, problems = export.verify_bundle(path, manifest_sha256=manifest_sha256)
    session = Session.objects.filter(pk=session_id).first()
    designs = manifest.get("designs") or {}
    if str(session_id) not in designs:
        problems.append(f"The bundle does not hold session {session_id}.")
    elif session is not None and designs[str(session_id)] != (design.digest(session.design) if session.design else None):
        problems.append(f"Session {session_id}'s design hash in the bundle is {designs[str(session_id)]}; the database's "
                        f"frozen design hashes to {design.digest(session.design) if session.design else None}.")
    scope = _scope_of(manifest.get("scope", ""))
    options = export.Options(format=manifest.get("table_format", "csv"), recruitment=manifest.get("recruitment_ids", "omit"))
    for t in export.TABLES:
        name = f"{t.name}.{options.format}"
        listed = manifest["files"].get(name)
        if listed is None:
            continue
        digest = hashlib.sha256()
        for chunk in export.encoded_chunks(t, scope=scope, options=options):
            digest.update(chunk)
        if digest.hexdigest() != listed.get("sha256"):
            problems.append(f"{name} differs from what the database exports now: the bundle's SHA-256 is "
                            f"{listed.get('sha256')}, the database's {digest.hexdigest()} (a row was edited, added "
                            "or removed on one side since the export).")
    return problems
