"""Tidy exports: every table is defined once here, streamed as CSV or JSON Lines, bundled with a codebook.

One definition per table (:data:`TABLES`) drives everything that leaves the platform as data: the
files in the zip bundle, ``codebook.md`` / ``codebook.json`` (column meanings come from the models'
``help_text`` wherever a column is a stored field, so the codebook cannot drift from the models), the
``export`` and ``codebook`` management commands, the staff download views and the API bundle endpoint.
Tables that no single query expresses (the adaptation metrics of :mod:`experiment.adaptation`) are
:data:`DERIVED_TABLES`: computed in Python from the same scope, written after the others, in the same
codebook and manifest.

Memory stays flat whatever the size: every table is one query whose rows are streamed a chunk at a
time (``QuerySet.iterator(chunk_size=…)``; on PostgreSQL psycopg's chunked ``stream()``, see
:func:`_iterate`), every derived value that SQL can compute is computed by the database, and rows go to
the zip stream a chunk at a time. ``bench/export.py`` holds it to ≤ 3 × PostgreSQL's own COPY.

Privacy: participant tokens are never exported. Recruitment ids (PROLIFIC_PID, STUDY_ID, SESSION_ID)
appear only when the caller asks for them (staff exports), optionally replaced by stable
pseudonyms (HMAC-SHA256 keyed with ``SECRET_KEY``).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import hmac
import io
import itertools
import json
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from django.apps import apps
from django.conf import settings
from django.core.exceptions import EmptyResultSet
from django.db import connection, connections, models, transaction
from django.db.models import (
    BooleanField,
    Case,
    Count,
    Expression,
    F,
    FilteredRelation,
    FloatField,
    IntegerField,
    OuterRef,
    Q,
    Subquery,
    TextField,
    Value,
    When,
)
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Cast, Coalesce, Length, NullIf

from experiment import adaptation
from experiment.models import (
    Belief,
    Choice,
    Event,
    Experiment,
    Group,
    Message,
    Participant,
    QuestionnaireResponse,
    Return,
    Session,
)
from experiment.questionnaire import QUESTIONS

P = Participant
Format = Literal["csv", "jsonl"]
Recruitment = Literal["omit", "include", "pseudonymise"]
FORMATS: tuple[str, ...] = ("csv", "jsonl")
CHUNK_ROWS = 2000
# Level 1 deflate: CSV still shrinks about 5×, at a fraction of the CPU time of the default level 6.
ZIP_LEVEL = 1
PSEUDONYM_CHARS = 16
# CSV from PostgreSQL's text (True) or from decoded values (False; the tests compare both).
_TEXT_CSV = True

TYPES = {
    "integer": "whole number",
    "number": "decimal number",
    "string": "text",
    "boolean": "True / False",
    "datetime": "UTC timestamp, ISO 8601 with a space between date and time (YYYY-MM-DD HH:MM:SS[.ffffff]+00:00)",
    "json": "JSON text in CSV; a nested value in JSON Lines",
}


class ExportError(ValueError):
    """A request for an export that cannot be served (unknown scope, bad option). Nothing was written."""


# ---- scope ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scope:
    """Which sessions an export covers: some sessions, the sessions of some experiments, or everything."""

    session_ids: tuple[int, ...] | None = None
    experiment_ids: tuple[int, ...] | None = None
    label: str = "all"

    @classmethod
    def everything(cls) -> Scope:
        return cls()

    @classmethod
    def for_sessions(cls, session_ids: Iterable[int]) -> Scope:
        ids = tuple(sorted({int(i) for i in session_ids}))
        if not ids:
            raise ExportError("Choose at least one session.")
        found = set(Session.objects.filter(pk__in=ids).values_list("pk", flat=True))
        missing = [i for i in ids if i not in found]
        if missing:
            raise ExportError(f"No session with id {', '.join(map(str, missing))}.")
        label = f"session-{ids[0]}" if len(ids) == 1 else f"sessions-{ids[0]}-and-{len(ids) - 1}-more"
        return cls(session_ids=ids, label=label)

    @classmethod
    def for_experiments(cls, experiment_ids: Iterable[int]) -> Scope:
        ids = tuple(sorted({int(i) for i in experiment_ids}))
        if not ids:
            raise ExportError("Choose at least one experiment.")
        slugs = dict(Experiment.objects.filter(pk__in=ids).values_list("pk", "slug"))
        missing = [i for i in ids if i not in slugs]
        if missing:
            raise ExportError(f"No experiment with id {', '.join(map(str, missing))}.")
        label = f"experiment-{slugs[ids[0]]}" if len(ids) == 1 else f"experiments-{slugs[ids[0]]}-and-{len(ids) - 1}-more"
        return cls(experiment_ids=ids, label=label)

    @classmethod
    def session(cls, session_id: int) -> Scope:
        return cls.for_sessions([session_id])

    @classmethod
    def experiment(cls, slug: str) -> Scope:
        pk = Experiment.objects.filter(slug=slug).values_list("pk", flat=True).first()
        if pk is None:
            known = ", ".join(Experiment.objects.order_by("slug").values_list("slug", flat=True)[:20]) or "none yet"
            raise ExportError(f'No experiment with slug "{slug}" (known: {known}).')
        return cls.for_experiments([pk])

    def q(self, session_path: str) -> Q:
        """Filter for a model whose session is reached through ``session_path`` (e.g. ``group__session``)."""
        if self.session_ids is not None:
            return Q(**{f"{session_path}__in": self.session_ids})
        if self.experiment_ids is not None:
            return Q(**{f"{session_path}__experiment__in": self.experiment_ids})
        return Q()

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "session_ids": list(self.session_ids) if self.session_ids is not None else None,
                "experiment_ids": list(self.experiment_ids) if self.experiment_ids is not None else None}


@dataclass(frozen=True)
class Options:
    format: Format = "csv"
    # "omit" unless the caller is staff: recruitment ids never leave by default.
    recruitment: Recruitment = "omit"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ExportError(f'Format must be one of {", ".join(FORMATS)}, not "{self.format}".')
        if self.recruitment not in ("omit", "include", "pseudonymise"):
            raise ExportError(f'Recruitment ids must be "omit", "include" or "pseudonymise", not "{self.recruitment}".')


# ---- columns and tables ------------------------------------------------------------------------------

Source = str | Expression


@dataclass(frozen=True)
class Column:
    """One exported column.

    ``sources`` are lookups on the table's model (``"selector__seat"``) or ORM expressions, fetched by
    the database. With one source and no ``combine`` the value goes out as fetched; ``combine`` turns
    several fetched values into one (for what SQL cannot compute identically on every backend).
    ``meaning`` may contain ``{help}``, replaced by the ``help_text`` of the field the first source
    names, so the codebook follows the models.
    """

    name: str
    sources: tuple[Source, ...]
    meaning: str = "{help}"
    type: str = ""
    unit: str = ""
    values: tuple[str, ...] = ()
    recruitment: bool = False
    combine: Callable[..., Any] | None = None
    field: str = ""  # the field that documents an expression source (its help_text fills {help})


def col(name: str, source: Source, meaning: str = "{help}", *, type: str = "", unit: str = "",
        values: Sequence[str] = (), recruitment: bool = False, field: str = "") -> Column:
    return Column(name=name, sources=(source,), meaning=meaning, type=type, unit=unit, values=tuple(values),
                  recruitment=recruitment, field=field)


@dataclass(frozen=True)
class Table:
    name: str
    row: str  # what one row is, for the codebook
    model: Callable[[], type[models.Model] | None]
    session_path: str
    columns: Callable[[], list[Column]]
    order_by: tuple[str, ...] = ("pk",)
    prepare: Callable[[models.QuerySet], models.QuerySet] | None = None
    note: str = ""


@dataclass(frozen=True)
class Resolved:
    """A column with everything the codebook says about it filled in."""

    name: str
    type: str
    unit: str
    meaning: str
    values: tuple[str, ...] = ()
    recruitment: bool = False

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "unit": self.unit, "meaning": self.meaning}
        if self.values:
            out["values"] = list(self.values)
        return out


def _field_at(model: type[models.Model], path: str) -> models.Field | None:
    """The model field a lookup path ends at (``"selector__seat"`` → Participant.seat)."""
    current: type[models.Model] | None = model
    found = None
    for part in path.split("__"):
        if current is None:
            return None
        try:
            found = current._meta.get_field(part)
        except Exception:
            return None
        current = found.related_model if found.is_relation else None
    return found


def _type_of(f: models.Field) -> str:
    if isinstance(f, models.BooleanField):
        return "boolean"
    if isinstance(f, models.DateTimeField):
        return "datetime"
    if isinstance(f, (models.IntegerField, models.ForeignKey, models.AutoField, models.OneToOneField)):
        return "integer"
    if isinstance(f, (models.FloatField, models.DecimalField)):
        return "number"
    if isinstance(f, models.JSONField):
        return "json"
    return "string"


def resolve(table: Table, column: Column) -> Resolved:
    model = table.model()
    first = column.sources[0]
    lookup = column.field or (first if isinstance(first, str) else "")
    f = _field_at(model, lookup) if model is not None and lookup else None
    help_text = str(f.help_text).strip().rstrip(".") if f is not None and f.help_text else ""
    if "{help}" in column.meaning and not help_text:
        raise ValueError(f"Column {table.name}.{column.name} takes its meaning from {lookup or 'an expression'}, "
                         "which has no help_text: add one to the model field or give the meaning here.")
    if column.meaning.startswith("{help}"):
        help_text = help_text[:1].upper() + help_text[1:]
    meaning = column.meaning.replace("{help}", help_text).strip()
    if meaning[-1] not in ".!?":
        meaning += "."
    kind = column.type or (_type_of(f) if f is not None else "")
    if not kind:
        raise ValueError(f"Column {table.name}.{column.name} needs an explicit type.")
    unit = column.unit or ("UTC" if kind == "datetime" else "")
    values = column.values or (tuple(str(v) for v, _ in f.choices) if f is not None and f.choices else ())
    return Resolved(name=column.name, type=kind, unit=unit, meaning=meaning,
                    values=values, recruitment=column.recruitment)


# ---- shared column builders ----------------------------------------------------------------------------

def _round_complete(group: str, round_field: str) -> Expression:
    """True once the round is settled (its return phase closed), evaluated per row by the database."""
    return Case(
        When(**{f"{group}__status": Group.Status.FINISHED}, then=Value(True)),
        When(**{f"{group}__round_number__gt": F(round_field)}, then=Value(True)),
        When(Q(**{f"{group}__round_number": F(round_field), f"{group}__phase__in": ["feedback", "belief"]}), then=Value(True)),
        default=Value(False), output_field=BooleanField(),
    )


def _is_bot(kind_path: str) -> Expression:
    return Case(When(**{f"{kind_path}__isnull": True}, then=Value(None)),
                When(**{kind_path: P.Kind.BOT}, then=Value(True)),
                default=Value(False), output_field=BooleanField())


def _counted() -> Expression:
    # The same rule as experiment.analysis.counted_choices (a test holds them together).
    machine = [P.Controller.SCRIPTED, P.Controller.LLM, P.Controller.SYNTHETIC]
    rule = Q(candidate__isnull=False, selector__kind=P.Kind.HUMAN, timed_out=False) & ~Q(decided_by__in=machine)
    return Case(When(rule, then=Value(True)), default=Value(False), output_field=BooleanField())


def _ratio(numerator: str, denominator: str) -> Expression:
    return Cast(F(numerator), FloatField()) / NullIf(Cast(F(denominator), FloatField()), Value(0.0))


def _group_columns(group: str, *, round_field: str | None) -> list[Column]:
    columns = [
        col("experiment", f"{group}__session__experiment__slug", "Experiment: {help}"),
        col("session_id", f"{group}__session_id", "Session id (see the admin / API)."),
        col("group_id", f"{group}_id", "Group id: one mini-society playing together through all rounds."),
        col("group_number", f"{group}__number"),
        col("condition", f"{group}__condition__name", "Condition (treatment arm) of the group: {help}"),
        col("society", f"{group}__society", "Society of the group: {help}"),
    ]
    if round_field is not None:
        columns += [
            col("round", round_field, "Round number, from 1."),
            col("round_complete", _round_complete(group, round_field),
                "True when the round is settled (its return phase has closed); False for a round still being "
                "played when the export was made, whose later decisions are missing.", type="boolean"),
        ]
    return columns


def _seat_columns(prefix: str, path: str, *, who: str) -> list[Column]:
    return [
        col(f"{prefix}_id", f"{path}_id", f"Participant id of the {who}."),
        col(f"{prefix}_seat", f"{path}__seat", f"Seat of the {who}: {{help}}"),
        col(f"{prefix}_kind", f"{path}__kind", f"Kind of the {who}: {{help}}"),
        col(f"{prefix}_controller", f"{path}__controller", f"Controller of the {who} at export time: {{help}}"),
    ]


# ---- the tables ---------------------------------------------------------------------------------------

def _bonus(payoff: int | None, rate: Decimal | None) -> Decimal | None:
    if payoff is None or rate is None:
        return None
    # Same rounding as experiment.services.bonus_of, which the completion page and the bonus file use.
    return (Decimal(payoff) * rate).quantize(Decimal("0.01"))


def _participants_columns() -> list[Column]:
    return [
        col("experiment", "session__experiment__slug", "Experiment: {help}"),
        col("session_id", "session_id", "Session id (see the admin / API)."),
        col("group_id", "group_id", "Group id; empty for a participant never placed in a group (declined, lobby timeout)."),
        col("group_number", "group__number"),
        col("condition", "group__condition__name", "Condition (treatment arm) of the participant's group: {help}"),
        col("society", "group__society", "Society of the participant's group: {help} Empty for a participant never "
                                         "placed in a group."),
        col("participant_id", "id", "Participant id (one seat; the same id appears in every other table)."),
        col("seat", "seat"),
        col("role", "role", "Role, fixed for the whole game: {help}", values=P.Role.values),
        col("kind", "kind"),
        col("is_bot", _is_bot("kind"), "True for a bot seat (kind = bot).", type="boolean"),
        col("controller", "controller"),
        col("bot_profile", Case(When(controller=P.Controller.LLM, then=F("group__condition__bot_profile__name")),
                                default=Value(""), output_field=TextField()),
            "Bot profile playing the seat, when a language model plays it (the condition's profile).", type="string"),
        col("bot_model", Case(When(controller=P.Controller.LLM, then=F("group__condition__bot_profile__model")),
                              default=Value(""), output_field=TextField()),
            "Model of that bot profile, when a language model plays the seat.", type="string"),
        col("bot_memory", Case(When(controller=P.Controller.LLM, then=F("group__condition__bot_profile__memory")),
                               default=Value(""), output_field=TextField()),
            "Memory arm of that bot profile at export time (none, own, group), when a language model plays the seat; "
            "each turn's own arm is in llm_calls.memory.", type="string"),
        col("status", "status", "Where the participant ended up (or is now, for a running session)."),
        col("prolific_pid", "prolific_pid", recruitment=True),
        col("study_id", "study_id", recruitment=True),
        col("recruitment_session_id", "recruitment_session_id", recruitment=True),
        col("quiz_attempts", "quiz_attempts"),
        col("payoff", "payoff", unit="points"),
        Column("bonus", ("payoff", "session__experiment__bonus_per_point"),
               "Money bonus: payoff × the experiment's bonus per point, rounded to cents (what the bonus file pays).",
               type="number", unit="currency units", combine=_bonus),
        col("currency", "session__experiment__currency"),
        col("joined_at", "joined_at"),
        col("lobby_at", "lobby_at"),
        col("finished_at", "finished_at", "When the participant finished, declined, timed out in the lobby or dropped out (UTC)."),
    ]


def _choices_prepare(qs: models.QuerySet) -> models.QuerySet:
    return qs.annotate(
        selector_round=FilteredRelation("selector__round_payoffs",
                                        condition=Q(selector__round_payoffs__round_number=F("round_number"))),
    )


def _choices_columns() -> list[Column]:
    returned = "return_decision__returned"
    return [
        *_group_columns("group", round_field="round_number"),
        col("choice_id", "id", "Choice id."),
        *_seat_columns("selector", "selector", who="selector"),
        col("candidate_id", "candidate_id", "Participant id of the chosen candidate; empty when the selector chose nobody."),
        col("candidate_seat", "candidate__seat", "Pseudonym (seat letter) of the chosen candidate."),
        col("candidate_kind", "candidate__kind", "Kind of the chosen candidate: {help}"),
        col("candidate_is_bot", _is_bot("candidate__kind"), "True when the chosen candidate is a bot seat; empty for no choice.",
            type="boolean"),
        col("candidate_controller", "candidate__controller", "What plays the chosen candidate's seat at export time: {help}"),
        col("label_shown", "label_shown", values=("Human", "AI bot", "")),
        col("position", "position"),
        col("order", Cast("order", TextField()), "{help} (JSON list).", type="json", field="order"),
        col("sent", "sent", unit="points"),
        col("multiplied", "multiplied", unit="points"),
        col("returned", returned, "Points the candidate returned to this selector; empty until the return is decided.",
            unit="points"),
        col("return_ratio", _ratio(returned, "multiplied"),
            "returned / multiplied; empty when nothing was sent or the return is not decided yet.",
            type="number", unit="share 0..1"),
        col("selector_payoff", "selector_round__points",
            "Points the selector earned in the round as settled by the game (endowment − sent + returned); empty "
            "until the round is settled.", type="integer", unit="points"),
        col("candidate_earned", Cast(F("multiplied") - F(returned), IntegerField()),
            "Points the candidate kept from this selector's transfer (multiplied − returned); empty until decided.",
            type="integer", unit="points"),
        col("choice_timed_out", "timed_out", "True when the choice is the default applied at the deadline."),
        col("choice_decided_by", "decided_by"),
        col("counted", _counted(),
            "True when the preference-shift analysis (manage.py analyze, docs/analysis.md) counts this choice: a human "
            "selector seat, a decision made by the person (not by a bot or synthetic filler after a takeover), a "
            "candidate chosen, and not a default applied at the deadline (analyze --include-timeouts adds those back: "
            "choice_timed_out = True with a candidate and a human selector seat). Filter on it to refit the model "
            "from this file alone.", type="boolean"),
        col("choice_seconds", "decision_seconds", unit="seconds"),
        col("return_timed_out", "return_decision__timed_out", "True when the return is the default (0) applied at the deadline."),
        col("return_decided_by", "return_decision__decided_by", "What made the return decision: {help}"),
        col("return_seconds", "return_decision__decision_seconds", unit="seconds"),
        col("chosen_at", "created_at"),
        col("returned_at", "return_decision__created_at", "Server time the return was stored (UTC)."),
    ]


def _times_chosen() -> Expression:
    chosen = (Choice.objects.filter(candidate=OuterRef("candidate"), round_number=OuterRef("round_number"))
              .order_by().values("candidate").annotate(n=Count("id")).values("n"))
    return Coalesce(Subquery(chosen, output_field=IntegerField()), Value(0))


def _messages_columns() -> list[Column]:
    return [
        *_group_columns("group", round_field="round_number"),
        col("message_id", "id", "Message id."),
        *_seat_columns("candidate", "candidate", who="candidate"),
        col("text", "text"),
        col("length", Length("text"), "Length of the text.", type="integer", unit="characters"),
        col("timed_out", "timed_out"),
        col("decided_by", "decided_by"),
        col("seconds", "decision_seconds", "Seconds from the start of the pitch phase to the message; empty when timed out.",
            unit="seconds"),
        col("times_chosen", _times_chosen(), "How many selectors chose this candidate in this round.", type="integer"),
        col("created_at", "created_at"),
    ]


def _returns_columns() -> list[Column]:
    return [
        *_group_columns("choice__group", round_field="choice__round_number"),
        col("return_id", "id", "Return id."),
        col("choice_id", "choice_id", "Id of the choice this return answers (choices.choice_id)."),
        *_seat_columns("candidate", "candidate", who="candidate"),
        *_seat_columns("selector", "choice__selector", who="selector"),
        col("sent", "choice__sent", unit="points"),
        col("available", "available", unit="points"),
        col("returned", "returned", unit="points"),
        col("return_ratio", _ratio("returned", "available"), "returned / available; empty when nothing was available.",
            type="number", unit="share 0..1"),
        col("timed_out", "timed_out"),
        col("decided_by", "decided_by"),
        col("decision_seconds", "decision_seconds", unit="seconds"),
        col("created_at", "created_at"),
    ]


def _beliefs_columns() -> list[Column]:
    return [
        *_group_columns("group", round_field="round_number"),
        col("belief_id", "id", "Belief id."),
        *_seat_columns("selector", "selector", who="selector"),
        *_seat_columns("candidate", "candidate", who="candidate judged"),
        col("guess", "guess"),
        col("correct", Case(When(guess="", then=Value(None)), When(guess=F("candidate__kind"), then=Value(True)),
                            default=Value(False), output_field=BooleanField()),
            "True when the guess matches the candidate's kind (False: misattribution); empty without a guess.",
            type="boolean"),
        col("confidence", "confidence", unit="percent"),
        col("timed_out", "timed_out", "True when the belief phase closed before the selector answered."),
        col("created_at", "created_at", "Server time the belief was stored (UTC)."),
    ]


def _questionnaire_columns() -> list[Column]:
    columns = [
        *_group_columns("participant__group", round_field=None),
        col("participant_id", "participant_id", "Participant id."),
        col("role", "participant__role", "Role of the participant: {help}", values=P.Role.values),
        col("seat", "participant__seat"),
        col("kind", "participant__kind"),
    ]
    for q in QUESTIONS:
        kind = "integer" if q["kind"] in ("number", "scale") else "string"
        unit = "years" if q["id"] == "age" else (f"scale {q['min']}..{q['max']}" if q["kind"] == "scale" else "")
        answer: Expression = KeyTextTransform(q["id"], "answers")
        if kind == "integer":
            answer = Cast(answer, IntegerField())
        columns.append(col(q["id"], answer, f'Answer to "{q["text"]}"', type=kind, unit=unit,
                           values=tuple(q.get("options", ()))))
    columns.append(col("submitted_at", "created_at", "Server time the questionnaire was submitted (UTC).",
                       type="datetime"))
    return columns


def _events_columns() -> list[Column]:
    return [
        col("event_id", "id", "Event id (increasing in the order events were stored)."),
        col("experiment", "session__experiment__slug", "Experiment: {help}"),
        col("session_id", "session_id", "Session id."),
        col("group_id", "group_id", "Group id; empty for events outside a group (joining, lobby)."),
        col("group_number", "group__number"),
        col("participant_id", "participant_id", "Participant the event concerns; empty for group-wide events."),
        col("participant_seat", "participant__seat", "Seat of that participant: {help}"),
        col("actor_id", "actor_id", "{help} (user id)."),
        col("type", "type"),
        col("round", "round_number", "Round of the group when the event happened."),
        col("phase", "phase", "Phase of the group when the event happened."),
        col("payload", Cast("payload", TextField()), "{help} (JSON object).", type="json", field="payload"),
        col("created_at", "created_at"),
    ]


# The LLM call log lives in the bots app (issue 3). The table keeps its columns whether or not the
# model exists yet, so an analyst's script never breaks on a missing file.
LLM_CALL_MODEL = ("bots", "LLMCall")


def llm_call_model() -> type[models.Model] | None:
    if not apps.is_installed("bots"):
        return None
    try:
        return apps.get_model(*LLM_CALL_MODEL)
    except LookupError:
        return None


_EMPTY = {"integer": IntegerField, "number": FloatField, "boolean": BooleanField, "datetime": models.DateTimeField}

# name, lookup on bots.LLMCall, type and meaning used when the model is absent (with it, its help_text is used)
LLM_COLUMNS: list[tuple[str, str, str, str]] = [
    ("llm_call_id", "id", "integer", "LLM call id."),
    ("experiment", "session__experiment__slug", "string", "Experiment: short unique identifier of the experiment."),
    ("session_id", "session_id", "integer", "Session id; empty for a test call made from the admin."),
    ("group_id", "group_id", "integer", "Group id."),
    ("group_number", "group__number", "integer", "Group number within the session, from 1."),
    ("condition", "group__condition__name", "string", "Condition (treatment arm) of the group."),
    ("society", "group__society", "string", "Society of the group: hybrid (people and bots) or ai_only (a bot in every seat)."),
    ("participant_id", "participant_id", "integer", "Participant id of the bot seat the call was made for."),
    ("seat", "participant__seat", "string", "Seat of the bot."),
    ("round", "round_number", "integer", "Round of the call."),
    ("phase", "phase", "string", "Phase of the call."),
    ("decision_id", "decision_id", "integer", "The bot's turn (decision) this call belongs to."),
    ("attempt", "attempt", "integer", "Attempt number within the decision, from 1."),
    ("throttled", "throttled", "integer", "Times the turn waited for its profile's limits before this request."),
    ("purpose", "purpose", "string", "Why the call was made."),
    ("profile", "profile__name", "string", "Bot profile used."),
    ("memory", "decision__memory", "string", "Memory arm the prompt was built with (none, own, group)."),
    ("memory_rounds", "decision__memory_rounds", "integer", "Most earlier rounds the prompt showed."),
    ("model", "model", "string", "Model requested."),
    ("model_reported", "model_reported", "string", "Model name the endpoint reported."),
    ("parameters", "parameters", "json", "Request parameters (base URL, temperature, top_p, seed, limits)."),
    ("request_messages", "request_messages", "json", "The exact chat messages sent."),
    ("response_format", "response_format", "json", "The response_format sent (JSON schema), if any."),
    ("raw_reply", "raw_reply", "string", "The reply text exactly as received."),
    ("refusal", "refusal", "string", "The model's refusal message, when it refused."),
    ("parsed", "parsed", "json", "The decision parsed from the reply."),
    ("tokens_in", "tokens_in", "integer", "Prompt tokens reported by the endpoint."),
    ("tokens_out", "tokens_out", "integer", "Completion tokens reported by the endpoint."),
    ("latency_ms", "latency_ms", "integer", "Time from request to reply or error (ms)."),
    ("cost", "cost", "number", "Cost in US dollars."),
    ("http_status", "http_status", "integer", "HTTP status of a failed request."),
    ("error_class", "error_class", "string", "Kind of failure."),
    ("error_message", "error_message", "string", "What went wrong, in words."),
    ("status", "status", "string", "Outcome of the call."),
    ("applied", "applied", "boolean", "Whether this call's decision was applied in the game."),
    ("created_at", "created_at", "datetime", "When the request was sent (UTC)."),
    ("finished_at", "finished_at", "datetime", "When the reply or error came back (UTC)."),
]
LLM_UNITS = {"tokens_in": "tokens", "tokens_out": "tokens", "latency_ms": "milliseconds", "cost": "USD"}
LLM_PREFIX = {"experiment": "Experiment: ", "condition": "Condition (treatment arm) of the group: ", "profile": "Bot profile: ",
              "seat": "Seat of the bot: "}


def _llm_columns() -> list[Column]:
    model = llm_call_model()
    columns = []
    for name, lookup, kind, meaning in LLM_COLUMNS:
        f = _field_at(model, lookup) if model is not None else None
        if f is None:
            # No model (or a field it lacks): the column stays, empty, so an analyst's script never breaks.
            source: Source = Value(None, output_field=_EMPTY.get(kind, TextField)())
        elif kind == "json":
            source = Cast(lookup, TextField())
        else:
            source = lookup
        own_help = f is not None and bool(f.help_text) and not f.is_relation
        text = LLM_PREFIX.get(name, "") + "{help}" if own_help else meaning
        columns.append(col(name, source, text, type=kind, unit=LLM_UNITS.get(name, ""),
                           field=lookup if own_help else ""))
    return columns


TABLES: list[Table] = [
    Table("participants", "one row per participant (seat), human or bot", lambda: Participant, "session",
          _participants_columns, order_by=("session_id", "group__number", "role", "seat", "id")),
    Table("choices", "one row per selector × round", lambda: Choice, "group__session", _choices_columns,
          order_by=("group__session_id", "group__number", "round_number", "selector__seat"), prepare=_choices_prepare),
    Table("messages", "one row per candidate × round", lambda: Message, "group__session", _messages_columns,
          order_by=("group__session_id", "group__number", "round_number", "candidate__seat")),
    Table("returns", "one row per return decision (a chosen candidate × a selector who chose them × round)",
          lambda: Return, "choice__group__session", _returns_columns,
          order_by=("choice__group__session_id", "choice__group__number", "choice__round_number", "candidate__seat",
                    "choice__selector__seat")),
    Table("beliefs", "one row per selector × candidate × belief round", lambda: Belief, "group__session",
          _beliefs_columns, order_by=("group__session_id", "group__number", "round_number", "selector__seat",
                                      "candidate__seat")),
    Table("questionnaire", "one row per participant who submitted the post-game questionnaire",
          lambda: QuestionnaireResponse, "participant__session", _questionnaire_columns,
          order_by=("participant__session_id", "participant__group__number", "participant__seat", "id")),
    Table("events", "one row per stored event (the full log of state changes)", lambda: Event, "session",
          _events_columns, order_by=("id",)),
    Table("llm_calls", "one row per request to a language model (bot seats played by an LLM)", llm_call_model, "session",
          _llm_columns, order_by=("id",), note="Empty when no bot seat was played by a language model."),
]
TABLES_BY_NAME = {t.name: t for t in TABLES}


def _named(tables: dict[str, Any], name: str, what: str) -> Any:
    try:
        return tables[name]
    except KeyError:
        raise ExportError(f'No {what} "{name}" ({what}s: {", ".join(tables)}).') from None


def table(name: str) -> Table:
    return _named(TABLES_BY_NAME, name, "table")


# ---- derived tables -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DerivedTable:
    """A table computed in Python from what other tables hold (e.g. the adaptation metrics), which no single
    query expresses. It follows the ORM tables in the bundle, the codebook and the manifest; the ORM tables are
    untouched, and the replay does not compare derived tables (they follow from the ones it compares)."""

    name: str
    row: str
    columns: tuple[Resolved, ...]
    rows: Callable[[Scope], Iterator[tuple]]
    note: str = ""


def _derived(spec: adaptation.DerivedSpec) -> DerivedTable:
    columns = tuple(Resolved(name=n, type=t, unit=u, meaning=m) for n, t, u, m in spec.columns)
    return DerivedTable(name=spec.name, row=spec.row, columns=columns,
                        rows=functools.partial(adaptation.spec_rows, spec), note=spec.note)


DERIVED_TABLES: list[DerivedTable] = [_derived(spec) for spec in adaptation.SPECS]
DERIVED_BY_NAME = {t.name: t for t in DERIVED_TABLES}


def derived_table(name: str) -> DerivedTable:
    return _named(DERIVED_BY_NAME, name, "derived table")


def derived_chunks(t: DerivedTable, *, scope: Scope, options: Options, counter: dict[str, int] | None = None,
                   chunk_size: int = CHUNK_ROWS) -> Iterator[bytes]:
    """A derived table as UTF-8 bytes, like :func:`encoded_chunks` (header first for CSV; values as Python's
    str(), so booleans read True / False as in the other tables)."""
    names = [c.name for c in t.columns]
    n = 0
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if options.format == "csv":
        writer.writerow(names)
        yield buffer.getvalue().encode()
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    for batch in _batches(t.rows(scope), chunk_size):
        n += len(batch)
        if options.format == "csv":
            buffer.seek(0)
            buffer.truncate()
            writer.writerows(batch)
            yield buffer.getvalue().encode()
        else:
            yield ("\n".join(dumps(dict(zip(names, row, strict=True))) for row in batch) + "\n").encode()
    if counter is not None:
        counter[t.name] = n


# ---- privacy ------------------------------------------------------------------------------------------

def pseudonym(value: str | None) -> str | None:
    """A stable, non-reversible stand-in for a recruitment id (same id → same pseudonym, per SECRET_KEY)."""
    if not value:
        return value
    digest = hmac.new(settings.SECRET_KEY.encode(), b"partnerlab-recruitment-id\x00" + value.encode(), hashlib.sha256)
    return digest.hexdigest()[:PSEUDONYM_CHARS]


def _active_columns(t: Table, options: Options) -> list[Column]:
    columns = []
    for c in t.columns():
        if c.recruitment:
            if options.recruitment == "omit":
                continue
            if options.recruitment == "pseudonymise":
                inner = c.combine
                c = replace(c, meaning=c.meaning + " Pseudonymised: the first 16 hex digits of HMAC-SHA256 of the id, "
                                                   "keyed with the site secret (stable across exports of this site).",
                            combine=(lambda v, inner=inner: pseudonym(inner(v) if inner else v)))
        columns.append(c)
    return columns


def columns_of(t: Table, options: Options | None = None) -> list[Resolved]:
    """The codebook entries of a table's columns, in file order, for these options."""
    return [resolve(t, c) for c in _active_columns(t, options or Options(recruitment="include"))]


# ---- reading rows -------------------------------------------------------------------------------------

@dataclass
class _Plan:
    queryset: models.QuerySet | None
    names: list[str]
    types: list[str]
    convert: Callable[[tuple], tuple] | None = field(default=None)


def _plan(t: Table, scope: Scope, options: Options) -> _Plan:
    columns = _active_columns(t, options)
    resolved = [resolve(t, c) for c in columns]
    model = t.model()
    if model is None:
        return _Plan(None, [r.name for r in resolved], [r.type for r in resolved])
    qs = model._default_manager.filter(scope.q(t.session_path))
    if t.prepare is not None:
        qs = t.prepare(qs)
    fetch: list[str] = []
    annotations: dict[str, Expression] = {}
    slices: list[tuple[int, int]] = []
    for c in columns:
        start = len(fetch)
        for source in c.sources:
            if isinstance(source, str):
                fetch.append(source)
            else:
                alias = f"x_{len(annotations)}"
                annotations[alias] = source
                fetch.append(alias)
        slices.append((start, len(fetch)))
    qs = qs.annotate(**annotations).order_by(*t.order_by).values_list(*fetch)
    identity = all(c.combine is None and len(c.sources) == 1 for c in columns)
    convert = None
    if not identity:
        steps = [(a, b, c.combine) for (a, b), c in zip(slices, columns, strict=True)]

        def convert(row: tuple) -> tuple:
            return tuple(fn(*row[a:b]) if fn else row[a] for a, b, fn in steps)

    return _Plan(qs, [r.name for r in resolved], [r.type for r in resolved], convert)


def _iterate(qs: models.QuerySet, chunk_size: int, *, as_text: bool = False) -> Iterator[Sequence[Any]]:
    """The rows of a ``values_list`` queryset, streamed a chunk at a time (memory stays flat).

    On PostgreSQL the rows are streamed from the plain query (not a cursor, which would rule out the
    parallel plan COPY gets), in binary: decoding text rows costs more than running the query, and
    Django's own timestamptz loader runs in Python. The query and Django's converters are the
    queryset's own, so the values are what ``.iterator()`` gives. ``as_text`` (CSV): PostgreSQL's text
    for each value, normalised to what Python's ``str()`` of the typed value gives, without decoding.
    """
    db = connections[qs.db]
    if db.vendor != "postgresql":
        yield from qs.iterator(chunk_size=chunk_size)
        return
    import psycopg

    compiler = qs.query.get_compiler(using=qs.db)
    try:
        sql, params = compiler.as_sql()
    except EmptyResultSet:
        return
    db.ensure_connection()
    raw = db.connection
    with db.wrap_database_errors:
        literal = psycopg.ClientCursor(raw).mogrify(sql, params)
        cursor = psycopg.Cursor(raw)
    if as_text:
        from psycopg.types.string import TextLoader

        for name in _TEXT_TYPES:
            cursor.adapters.register_loader(name, TextLoader)
    with db.wrap_database_errors, cursor:
        stream = cursor.stream(literal, binary=not as_text, size=chunk_size)
        if as_text:
            first = next(stream, None)
            if first is None:
                return
            fixes = [(i, fix) for i, column in enumerate(cursor.description) if (fix := _text_fix(column.type_code))]
            yield from (_text_row(row, fixes) for row in itertools.chain((first,), stream)) if fixes \
                else itertools.chain((first,), stream)
            return
        fields = [s[0] for s in compiler.select[0 : compiler.col_count]]
        # Binary rows already hold int, float, Decimal, bool: the expressions' type coercions are no-ops
        # here, and applying them costs more than reading the row. Any other converter still applies.
        converters = {pos: (kept, expression) for pos, (funcs, expression) in compiler.get_converters(fields).items()
                      if (kept := [f for f in funcs if not _is_type_coercion(f)])}
        yield from compiler.apply_converters(stream, converters) if converters else stream


def _is_type_coercion(converter: Callable[..., Any]) -> bool:
    return getattr(converter, "__qualname__", "").startswith(("BaseExpression.convert_value", "BaseExpression._convert_value_noop"))


# Types read as PostgreSQL's text in the CSV path; only those in _text_fix differ from Python's str().
_TEXT_TYPES = ("int2", "int4", "int8", "oid", "float4", "float8", "numeric", "bool", "timestamptz", "text", "varchar",
               "bpchar", "json", "jsonb")


def _text_fix(oid: int) -> Callable[[str], str] | None:
    return _text_fixes().get(oid)


@functools.cache
def _text_fixes() -> dict[int, Callable[[str], str]]:
    from psycopg.postgres import types

    return {types["bool"].oid: _bool_text, types["float8"].oid: _float_text, types["float4"].oid: _float_text,
            types["timestamptz"].oid: _timestamp_text}


_BOOL_TEXT = {"t": "True", "f": "False"}


def _bool_text(text: str) -> str:
    return _BOOL_TEXT[text]


def _float_text(text: str) -> str:
    # PostgreSQL prints the shortest exact digits, as repr() does, but "2" where Python says "2.0" and
    # switches to exponents at a different size.
    if "e" in text or "n" in text or "N" in text:
        return repr(float(text))
    return text if "." in text else text + ".0"


def _timestamp_text(text: str) -> str:
    # "2026-01-02 03:04:05.12+00" → "2026-01-02 03:04:05.120000+00:00" (str() of the UTC datetime).
    if len(text) >= 22 and text.endswith("+00") and text[10] == " ":
        head = text[:-3]
        if len(head) == 19:
            return head + "+00:00"
        if head[19] == ".":
            return head[:20] + head[20:].ljust(6, "0") + "+00:00"
    return str(datetime.fromisoformat(text).astimezone(UTC))


def _text_row(row: Sequence[Any], fixes: list[tuple[int, Callable[[str], str]]]) -> list[Any]:
    out = list(row)
    for i, fix in fixes:
        value = out[i]
        if value is not None:
            out[i] = fix(value)
    return out


def rows(t: Table, *, scope: Scope, options: Options, chunk_size: int = CHUNK_ROWS) -> Iterator[tuple]:
    """Every row of a table in scope, as Python values in column order, read a chunk at a time."""
    plan = _plan(t, scope, options)
    if plan.queryset is None:
        return iter(())
    it = _iterate(plan.queryset, chunk_size)
    return map(plan.convert, it) if plan.convert else it


def _batches(it: Iterable[tuple], size: int) -> Iterator[list[tuple]]:
    it = iter(it)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def encoded_chunks(t: Table, *, scope: Scope, options: Options, counter: dict[str, int] | None = None,
                   chunk_size: int = CHUNK_ROWS) -> Iterator[bytes]:
    """The table as UTF-8 bytes (header first for CSV), one chunk per ``chunk_size`` rows."""
    plan = _plan(t, scope, options)
    n = 0
    if options.format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(plan.names)
        yield buffer.getvalue().encode()
        if plan.queryset is not None:
            # A table whose values all go out as fetched can be written from the database's text.
            it = _iterate(plan.queryset, chunk_size, as_text=plan.convert is None and _TEXT_CSV)
            for batch in _batches(map(plan.convert, it) if plan.convert else it, chunk_size):
                buffer.seek(0)
                buffer.truncate()
                writer.writerows(batch)
                n += len(batch)
                yield buffer.getvalue().encode()
    else:
        if plan.queryset is not None:
            names = plan.names
            json_columns = [i for i, kind in enumerate(plan.types) if kind == "json"]
            dumps = json.JSONEncoder(ensure_ascii=False, default=_json_value).encode
            it = _iterate(plan.queryset, chunk_size)
            for batch in _batches(map(plan.convert, it) if plan.convert else it, chunk_size):
                lines = []
                for row in batch:
                    record = dict(zip(names, row, strict=True))
                    for i in json_columns:
                        text = row[i]
                        record[names[i]] = json.loads(text) if isinstance(text, str) and text else text
                    lines.append(dumps(record))
                n += len(batch)
                yield ("\n".join(lines) + "\n").encode()
    if counter is not None:
        counter[t.name] = n


# ---- codebook ----------------------------------------------------------------------------------------

# What `manage.py replay --check` (experiment/replay.py) cannot reproduce exactly, said in the codebook.
REPLAY_CLOCK_COLUMNS = ("joined_at", "lobby_at", "finished_at", "chosen_at", "returned_at", "created_at", "submitted_at",
                        "choice_seconds", "return_seconds", "seconds", "decision_seconds")
REPLAY_CLOCK_TOLERANCE_MS = 250
REPLAY_NOT_REPLAYED = ("llm_calls", "events")


def replay_id_column(name: str) -> bool:
    """Ids of rows a replay creates anew: every ``*_id`` column but ``session_id`` (the session is the same)."""
    return name.endswith("_id") and name != "session_id"


def codebook(*, options: Options | None = None, scope: Scope | None = None, counts: dict[str, int] | None = None,
             tables: Sequence[Table] = TABLES, derived: Sequence[DerivedTable] = DERIVED_TABLES) -> dict[str, Any]:
    """The codebook as data: tables, their rows, and every column with type, unit and meaning."""
    options = options or Options(recruitment="include")
    book: dict[str, Any] = {
        "title": "PartnerLab data export",
        "format": options.format,
        "conventions": {
            "encoding": "UTF-8",
            "missing": "empty field in CSV, null in JSON Lines",
            "types": TYPES,
            "ids": "Numeric ids are the platform's database ids and link the tables (e.g. choices.selector_id = "
                   "participants.participant_id).",
            "designs": "designs.json holds, per session, the experiment's design (every parameter, condition and "
                       "bot profile) frozen when the session admitted its first participant, with the SHA-256 of its "
                       "canonical JSON.",
            "manifest": "A bundle ends with manifest.json: the SHA-256, size and row count of every other file, and "
                        "each session's design hash. "
                        "The export prints the manifest's own SHA-256; `manage.py verify_export BUNDLE "
                        "--manifest-sha256 HASH` checks that no file was changed, removed or added.",
            "replay": "`manage.py replay SESSION_ID --check` re-runs a finished session from its seed, frozen design "
                      "and logged inputs and compares every table row by row. Not compared: the ids (every `*_id` "
                      "column but `session_id`: the replay's rows are new); the wall-clock columns ("
                      + ", ".join(f"`{c}`" for c in REPLAY_CLOCK_COLUMNS)
                      + f") are compared within {REPLAY_CLOCK_TOLERANCE_MS} ms, because the replay stamps an "
                      "input with its logged time, and the live server read its clock earlier: before it wrote the row "
                      "and logged the event, which on a loaded machine takes tens of milliseconds. "
                      "`llm_calls` is an input of the replay (model seats decide by their logged replies), and "
                      "`events` is compared stream by stream (docs/replay.md).",
        },
        "recruitment_ids": {"omit": "not included", "include": "included as collected",
                            "pseudonymise": "replaced by stable pseudonyms"}[options.recruitment],
        "tables": [],
    }
    if scope is not None:
        book["scope"] = scope.describe()
        book["generated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    for t in tables:
        entry: dict[str, Any] = {"name": t.name, "file": f"{t.name}.{options.format}", "row": t.row,
                                 "columns": [c.as_dict() for c in columns_of(t, options)]}
        if t.note:
            entry["note"] = t.note
        if counts is not None and t.name in counts:
            entry["rows"] = counts[t.name]
        book["tables"].append(entry)
    for d in derived:
        entry = {"name": d.name, "file": f"{d.name}.{options.format}", "row": d.row,
                 "columns": [c.as_dict() for c in d.columns]}
        if d.note:
            entry["note"] = d.note
        if counts is not None and d.name in counts:
            entry["rows"] = counts[d.name]
        book["tables"].append(entry)
    return book


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def codebook_markdown(book: dict[str, Any]) -> str:
    lines = [f"# {book['title']}: codebook", "",
             "Generated from the export table definitions (`experiment/export.py`) and the models' `help_text`; "
             "regenerate with `python manage.py codebook --out docs/codebook.md`. Do not edit by hand.", ""]
    if "scope" in book:
        lines += [f"Scope: `{book['scope']['label']}`. Generated at {book['generated_at']}. "
                  f"Format: {book['format']}. Recruitment ids: {book['recruitment_ids']}.", ""]
    conventions = book["conventions"]
    lines += ["## Conventions", "",
              f"- Encoding: {conventions['encoding']}; one file per table; missing values: {conventions['missing']}.",
              f"- {conventions['ids']}", f"- {conventions['designs']}",
              f"- {conventions['manifest']}", f"- {conventions['replay']}", "- Types:"]
    lines += [f"  - `{name}`: {meaning}" for name, meaning in conventions["types"].items()]
    lines.append("")
    for entry in book["tables"]:
        count = f" ({entry['rows']} rows)" if "rows" in entry else ""
        lines += [f"## `{entry['file']}`{count}", "", f"One row: {entry['row']}." + (f" {entry['note']}" if entry.get("note") else ""),
                  "", "| column | type | unit | meaning |", "|---|---|---|---|"]
        for c in entry["columns"]:
            meaning = c["meaning"]
            if c.get("values"):
                meaning += " Values: " + ", ".join(f"`{v}`" if v else "(empty)" for v in c["values"]) + "."
            lines.append(f"| `{c['name']}` | {c['type']} | {_md_cell(c['unit'])} | {_md_cell(meaning)} |")
        lines.append("")
    return "\n".join(lines)


# ---- the bundle ---------------------------------------------------------------------------------------

class _Sink(io.RawIOBase):
    """A write-only, non-seekable stream that hands out what was written since the last drain."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def drain(self) -> Iterator[bytes]:
        if self._parts:
            data = b"".join(self._parts)
            self._parts.clear()
            yield data


def _snapshot() -> Any:
    """One consistent read of every table on PostgreSQL (a running session keeps writing meanwhile)."""
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        return _Nothing()
    return _ReadOnlySnapshot()


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _ReadOnlySnapshot:
    def __enter__(self) -> None:
        self._atomic = transaction.atomic()
        self._atomic.__enter__()
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")

    def __exit__(self, *exc: Any) -> None:
        self._atomic.__exit__(*exc)


def bundle_name(scope: Scope, options: Options) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"partnerlab-{scope.label}-{options.format}-{stamp}.zip"


# ---- manifest: what a bundle holds, with a hash of every file -------------------------------------------

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "partnerlab-export-manifest/1"


class _Manifest:
    """Collects the SHA-256 and size of every file as it is written, and renders manifest.json.

    The manifest lets anyone who receives a bundle check that no file was edited, truncated, added or left
    out (``manage.py verify_export``). It is tamper-evident only against its own hash, which the export
    prints: record that hash (in a lab notebook, a preregistration, the paper's replication package) and a
    changed manifest shows too.
    """

    def __init__(self, *, scope: Scope, options: Options) -> None:
        self.scope, self.options = scope, options
        self.files: dict[str, dict[str, Any]] = {}
        self.sha256 = ""  # of the rendered manifest itself

    def add(self, name: str, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Pass ``chunks`` through, hashing them as file ``name``."""
        digest, size = hashlib.sha256(), 0
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
            yield chunk
        self.files[name] = {"sha256": digest.hexdigest(), "bytes": size}

    def render(self, counts: dict[str, int], designs: dict[str, str | None]) -> bytes:
        for t in [*TABLES, *DERIVED_TABLES]:
            self.files[f"{t.name}.{self.options.format}"]["rows"] = counts.get(t.name, 0)
        document = {"format": MANIFEST_FORMAT, "scope": self.scope.label, "table_format": self.options.format,
                    "recruitment_ids": self.options.recruitment, "algorithm": "sha256",
                    "files": dict(sorted(self.files.items())), "designs": designs}
        data = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()
        self.sha256 = hashlib.sha256(data).hexdigest()
        return data


def _bundle_files(*, scope: Scope, options: Options, counts: dict[str, int],
                  manifest: _Manifest) -> Iterator[tuple[str, Iterator[bytes]]]:
    """(name, chunks) of every file of a bundle, in order, the manifest last (it needs the others' hashes)."""
    for t in TABLES:
        name = f"{t.name}.{options.format}"
        yield name, manifest.add(name, encoded_chunks(t, scope=scope, options=options, counter=counts))
    for d in DERIVED_TABLES:
        name = f"{d.name}.{options.format}"
        yield name, manifest.add(name, derived_chunks(d, scope=scope, options=options, counter=counts))
    designs = session_designs(scope)
    yield DESIGNS, manifest.add(DESIGNS, [(json.dumps(designs, indent=2, ensure_ascii=False) + "\n").encode()])
    book = codebook(options=options, scope=scope, counts=counts)
    yield "codebook.md", manifest.add("codebook.md", [codebook_markdown(book).encode()])
    yield "codebook.json", manifest.add("codebook.json", [json.dumps(book, indent=2, ensure_ascii=False).encode()])
    yield MANIFEST, iter([manifest.render(counts, {str(d["session_id"]): d["sha256"] for d in designs})])


DESIGNS = "designs.json"


def session_designs(scope: Scope) -> list[dict[str, Any]]:
    """Every session of the scope with its frozen design and the design's SHA-256 (experiment/design.py); a
    session nobody has joined yet has none (null)."""
    from experiment import design

    sessions = Session.objects.select_related("experiment").order_by("id")
    if scope.session_ids is not None:
        sessions = sessions.filter(pk__in=scope.session_ids)
    elif scope.experiment_ids is not None:
        sessions = sessions.filter(experiment__in=scope.experiment_ids)
    return [{"session_id": s.pk, "experiment": s.experiment.slug,
             "frozen_at": s.design_frozen_at.isoformat() if s.design_frozen_at else None,
             "sha256": design.digest(s.design) if s.design is not None else None, "design": s.design}
            for s in sessions.iterator(chunk_size=100)]


def bundle_stream(*, scope: Scope, options: Options, counts: dict[str, int] | None = None,
                  digests: dict[str, str] | None = None) -> Iterator[bytes]:
    """The zip bundle as a stream of byte chunks: one file per table, codebook.md and codebook.json, then
    manifest.json (the SHA-256 of each). ``digests``, if given, receives the manifest's own SHA-256 under
    ``MANIFEST``."""
    counts = {} if counts is None else counts
    manifest = _Manifest(scope=scope, options=options)
    sink = _Sink()
    with _snapshot(), zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=ZIP_LEVEL) as archive:
        stamp = datetime.now(UTC).timetuple()[:6]
        for name, chunks in _bundle_files(scope=scope, options=options, counts=counts, manifest=manifest):
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            # The level of an entry opened from a ZipInfo: public from Python 3.13, private before.
            setattr(info, "compress_level" if hasattr(info, "compress_level") else "_compresslevel", ZIP_LEVEL)
            with archive.open(info, "w", force_zip64=True) as entry:
                for chunk in chunks:
                    entry.write(chunk)
                    yield from sink.drain()
    if digests is not None:
        digests[MANIFEST] = manifest.sha256
    yield from sink.drain()


def bundle_write(*, scope: Scope, options: Options, out: io.BufferedIOBase | Any,
                 digests: dict[str, str] | None = None) -> dict[str, int]:
    """Write the bundle to a binary file object. Returns the row count of every table."""
    counts: dict[str, int] = {}
    for chunk in bundle_stream(scope=scope, options=options, counts=counts, digests=digests):
        out.write(chunk)
    return counts


def tables_write(*, scope: Scope, options: Options, directory: Any,
                 digests: dict[str, str] | None = None) -> dict[str, int]:
    """Write the tables, the codebook and the manifest as loose files into ``directory`` (a pathlib.Path)."""
    counts: dict[str, int] = {}
    manifest = _Manifest(scope=scope, options=options)
    directory.mkdir(parents=True, exist_ok=True)
    with _snapshot():
        for name, chunks in _bundle_files(scope=scope, options=options, counts=counts, manifest=manifest):
            with open(directory / name, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
    if digests is not None:
        digests[MANIFEST] = manifest.sha256
    return counts


def verify_bundle(path: Any, *, manifest_sha256: str = "") -> tuple[dict[str, Any], list[str]]:
    """Check a bundle (a .zip or a directory of loose files) against its manifest, and the manifest against
    ``manifest_sha256`` when given: (manifest, problems in plain words; empty when every file is there,
    unchanged, and nothing else is)."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        names = {p.name for p in path.iterdir() if p.is_file()}

        def read(name: str) -> Iterator[bytes]:
            with open(path / name, "rb") as f:
                yield from iter(lambda: f.read(1 << 20), b"")
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:

            def read_member(name: str) -> Iterator[bytes]:
                with archive.open(name) as f:
                    yield from iter(lambda: f.read(1 << 20), b"")

            return _check_manifest(path, set(archive.namelist()), read_member, manifest_sha256)
    else:
        raise ExportError(f"{path} is neither a zip bundle nor a directory.")
    return _check_manifest(path, names, read, manifest_sha256)


def _check_manifest(path: Any, names: set[str], read: Callable[[str], Iterator[bytes]],
                    manifest_sha256: str) -> tuple[dict[str, Any], list[str]]:
    if MANIFEST not in names:
        raise ExportError(f"{path} has no {MANIFEST}: it was not written by this version's export, or it was removed.")
    raw = b"".join(read(MANIFEST))
    problems = []
    if manifest_sha256 and hashlib.sha256(raw).hexdigest() != manifest_sha256.strip().lower():
        problems.append(f"{MANIFEST} was changed: its SHA-256 is {hashlib.sha256(raw).hexdigest()}, not the recorded "
                        f"{manifest_sha256.strip()}.")
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(manifest.get("format"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{MANIFEST} in {path} is not a PartnerLab manifest ({exc}).") from None
    for name, expected in files.items():
        if name not in names:
            problems.append(f"{name} is listed in the manifest but missing from the bundle.")
            continue
        digest, size = hashlib.sha256(), 0
        for chunk in read(name):
            digest.update(chunk)
            size += len(chunk)
        if digest.hexdigest() != expected.get("sha256") or size != expected.get("bytes"):
            problems.append(f"{name} was changed: its SHA-256 is {digest.hexdigest()} ({size} bytes), the manifest "
                            f"says {expected.get('sha256')} ({expected.get('bytes')} bytes).")
    for name in sorted(names - set(files) - {MANIFEST}):
        problems.append(f"{name} is in the bundle but not in the manifest (added after the export).")
    return manifest, problems


# ---- Prolific bonus file ------------------------------------------------------------------------------

def prolific_bonus_rows(*, session_id: int) -> list[tuple[str, str]]:
    """(PROLIFIC_PID, amount) for every participant of the session with a recruitment id and a bonus > 0.

    Amounts are in the experiment's currency with two decimals, computed like the completion page
    (:func:`experiment.services.bonus_of`). Prolific rejects zero bonuses, so those are left out.
    """
    session = Session.objects.select_related("experiment").filter(pk=session_id).first()
    if session is None:
        raise ExportError(f"No session with id {session_id}.")
    rate = session.experiment.bonus_per_point
    out = []
    for pid, payoff in (session.participants.exclude(prolific_pid="").order_by("prolific_pid")
                        .values_list("prolific_pid", "payoff")):
        amount = _bonus(payoff, rate)
        if amount is not None and amount > 0:
            out.append((pid, f"{amount:.2f}"))
    return out


def prolific_bonus_csv(*, session_id: int) -> str:
    """Prolific's bulk-bonus format: ``PROLIFIC_PID,amount`` per line, no header."""
    return "".join(f"{pid},{amount}\n" for pid, amount in prolific_bonus_rows(session_id=session_id))
