"""Exports: every table holds exactly what the game stored, the codebook matches the files, privacy holds,
a running session is marked as such, and the staff downloads and the Prolific bonus file are right."""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.db import connections
from django.test import AsyncClient, Client
from django.utils import timezone

from experiment import export, services
from experiment.export import Options, Scope
from experiment.models import (
    Belief,
    Choice,
    Event,
    Message,
    Participant,
    QuestionnaireResponse,
    Return,
    RoundPayoff,
    Session,
)
from experiment.questionnaire import QUESTIONS
from tests import factories
from tests.experiment import playthrough

pytestmark = pytest.mark.django_db

P = Participant
BUNDLE_EXTRAS = {"codebook.md", "codebook.json", "designs.json", "manifest.json"}
# The tables of the stored rows, then those computed from them (experiment/adaptation.py, tested there).
ALL_TABLES = [*export.TABLES, *export.DERIVED_TABLES]


def s(value: Any) -> str:
    """What the CSV holds for a stored value."""
    return "" if value is None else str(value)


def bundle(scope: Scope, options: Options) -> dict[str, bytes]:
    out = io.BytesIO()
    export.bundle_write(scope=scope, options=options, out=out)
    with zipfile.ZipFile(io.BytesIO(out.getvalue())) as archive:
        assert archive.testzip() is None
        return {name: archive.read(name) for name in archive.namelist()}


def tables(files: dict[str, bytes]) -> dict[str, list[dict[str, str]]]:
    return {name.removesuffix(".csv"): list(csv.DictReader(io.StringIO(data.decode())))
            for name, data in files.items() if name.endswith(".csv")}


def by(rows: list[dict[str, str]], key: str) -> dict[str, dict[str, str]]:
    out = {r[key]: r for r in rows}
    assert len(out) == len(rows), f"duplicate {key}"
    return out


@pytest.fixture
def played() -> Session:
    return playthrough.session_played()


# ---- every table equals what the game stored ------------------------------------------------------------

def _group_part(g: Any) -> dict[str, str]:
    return {"experiment": g.session.experiment.slug, "session_id": s(g.session_id), "group_id": s(g.pk),
            "group_number": s(g.number), "condition": g.condition.name, "society": g.society}


def _settled(participant_id: int, round_number: int) -> bool:
    return RoundPayoff.objects.filter(participant_id=participant_id, round_number=round_number).exists()


def _llm_calls_record(session: Session) -> list[Any]:
    """LLM calls as the bot backend stores them (the scripted backend played these games, so none were made)."""
    from bots.models import BotDecision, BotProfile, LLMCall

    profile = BotProfile.objects.create(name="test profile", model="gpt-test", requires_key=False)
    bot = session.participants.filter(kind="bot").select_related("group__condition").first()
    # As when the arm's profile is ready: the condition names the profile and a language model plays the seat.
    bot.group.condition.bot_profile = profile
    bot.group.condition.save(update_fields=["bot_profile"])
    Participant.objects.filter(pk=bot.pk).update(controller=P.Controller.LLM)
    common = {"participant": bot, "group": bot.group, "session": session, "profile": profile, "model": "gpt-test"}
    turn = BotDecision.objects.create(participant=bot, group=bot.group, session=session, profile=profile, round_number=1,
                                      phase="pitch", memory="group", memory_rounds=3)
    calls = [
        LLMCall.objects.create(**common, decision=turn, round_number=1, phase="pitch",
                               request_messages=[{"role": "user", "content": "Hi, \"you\""}],
                               raw_reply='{"text": "hello"}', parsed={"text": "hello"}, tokens_in=120, tokens_out=9,
                               latency_ms=850, cost=Decimal("0.000123"), status="ok", applied=True,
                               parameters={"temperature": 1.0}, finished_at=timezone.now()),
        LLMCall.objects.create(**common, round_number=1, phase="return", attempt=2, throttled=2, http_status=429,
                               error_class="RateLimitError", error_message="slow down", status="error"),
    ]
    LLMCall.objects.create(model="gpt-test", purpose="profile_test", profile=profile, status="ok")  # no session
    return calls


def test_every_table_equals_the_stored_game(played: Session) -> None:
    calls = _llm_calls_record(played)
    files = bundle(Scope.session(played.pk), Options(recruitment="include"))
    assert set(files) == {f"{t.name}.csv" for t in ALL_TABLES} | BUNDLE_EXTRAS
    data = tables(files)

    groups = list(played.groups.select_related("condition", "session__experiment"))
    assert {g.condition.name for g in groups} == {"hidden", "disclosed"}  # one full game per condition
    assert all(g.status == "finished" for g in groups)

    # participants
    people = list(Participant.objects.filter(session=played).select_related("group__condition", "session__experiment"))
    rows = by(data["participants"], "participant_id")
    assert set(rows) == {s(p.pk) for p in people} and len(people) == 2 * 7 + 2
    assert sum(p.controller == "llm" for p in people) == 1
    for p in people:
        profile = p.group.condition.bot_profile if p.group and p.controller == "llm" else None
        expected = {"experiment": played.experiment.slug, "session_id": s(played.pk), "group_id": s(p.group_id),
                    "group_number": s(p.group.number if p.group else None),
                    "condition": p.group.condition.name if p.group else "", "society": p.group.society if p.group else "",
                    "participant_id": s(p.pk), "seat": p.seat,
                    "role": p.role, "kind": p.kind, "is_bot": s(p.kind == "bot"), "controller": p.controller,
                    "bot_profile": profile.name if profile else "", "bot_model": profile.model if profile else "",
                    "bot_memory": profile.memory if profile else "", "status": p.status,
                    "prolific_pid": p.prolific_pid, "study_id": p.study_id,
                    "recruitment_session_id": p.recruitment_session_id, "quiz_attempts": s(p.quiz_attempts),
                    "payoff": s(p.payoff), "bonus": s(services.bonus_of(p)), "currency": played.experiment.currency,
                    "joined_at": s(p.joined_at), "lobby_at": s(p.lobby_at), "finished_at": s(p.finished_at)}
        assert rows[s(p.pk)] == expected
        if p.group:
            assert p.payoff == sum(RoundPayoff.objects.filter(participant=p).values_list("points", flat=True))

    # choices: one row per selector × round
    choices = list(Choice.objects.filter(group__session=played)
                   .select_related("group__condition", "group__session__experiment", "selector", "candidate"))
    rows = by(data["choices"], "choice_id")
    assert len(rows) == 2 * 3 * playthrough.ROUNDS == len(choices)
    assert len({(r["selector_id"], r["round"]) for r in rows.values()}) == len(rows)
    for c in choices:
        ret = Return.objects.filter(choice=c).first()
        returned = ret.returned if ret else None
        payoff = RoundPayoff.objects.filter(participant=c.selector, round_number=c.round_number).first()
        expected = {**_group_part(c.group), "round": s(c.round_number),
                    "round_complete": s(_settled(c.selector_id, c.round_number)), "choice_id": s(c.pk),
                    "selector_id": s(c.selector_id), "selector_seat": c.selector.seat, "selector_kind": c.selector.kind,
                    "selector_controller": c.selector.controller, "candidate_id": s(c.candidate_id),
                    "candidate_seat": c.candidate.seat, "candidate_kind": c.candidate.kind,
                    "candidate_is_bot": s(c.candidate.kind == "bot"), "candidate_controller": c.candidate.controller,
                    "label_shown": c.label_shown, "position": s(c.position), "order": json.dumps(c.order),
                    "sent": s(c.sent), "multiplied": s(c.multiplied), "returned": s(returned),
                    "return_ratio": s(returned / c.multiplied if c.multiplied and ret else None),
                    "selector_payoff": s(payoff.points if payoff else None),
                    "candidate_earned": s(c.multiplied - returned if ret else None),
                    "choice_timed_out": s(c.timed_out), "choice_decided_by": c.decided_by,
                    "counted": s(c.candidate_id is not None and c.selector.kind == "human" and not c.timed_out
                                 and c.decided_by not in ("scripted", "llm", "synthetic")),
                    "choice_seconds": s(c.decision_seconds), "return_decided_by": ret.decided_by if ret else "",
                    "return_timed_out": s(ret.timed_out if ret else None),
                    "return_seconds": s(ret.decision_seconds if ret else None), "chosen_at": s(c.created_at),
                    "returned_at": s(ret.created_at if ret else None)}
        assert rows[s(c.pk)] == expected
        assert int(expected["selector_payoff"]) == 10 - c.sent + returned  # the game's payoff rule, as stored
        assert c.label_shown == (("AI bot" if c.candidate.kind == "bot" else "Human") if c.group.condition.disclose_identity else "")
    assert {r["label_shown"] for r in rows.values() if r["condition"] == "disclosed"} <= {"Human", "AI bot"}
    assert {r["candidate_kind"] for r in rows.values()} == {"human", "bot"}

    # messages: one row per candidate × round
    messages = list(Message.objects.filter(group__session=played).select_related("group__condition", "group__session__experiment",
                                                                                  "candidate"))
    rows = by(data["messages"], "message_id")
    assert len(rows) == 2 * 4 * playthrough.ROUNDS == len(messages)
    for m in messages:
        assert Event.objects.filter(type="pitch.submitted", participant=m.candidate, round_number=m.round_number).exists()
        expected = {**_group_part(m.group), "round": s(m.round_number), "round_complete": "True",
                    "message_id": s(m.pk), "candidate_id": s(m.candidate_id), "candidate_seat": m.candidate.seat,
                    "candidate_kind": m.candidate.kind, "candidate_controller": m.candidate.controller, "text": m.text,
                    "length": s(len(m.text)), "timed_out": s(m.timed_out), "decided_by": m.decided_by,
                    "seconds": s(m.decision_seconds),
                    "times_chosen": s(Choice.objects.filter(candidate=m.candidate, round_number=m.round_number).count()),
                    "created_at": s(m.created_at)}
        assert rows[s(m.pk)] == expected
    assert any('"ok"?' in r["text"] for r in rows.values())  # quotes survive the CSV round trip

    # returns
    returns = list(Return.objects.filter(choice__group__session=played)
                   .select_related("choice__group__condition", "choice__group__session__experiment", "candidate",
                                   "choice__selector"))
    rows = by(data["returns"], "return_id")
    assert len(rows) == len(returns) == len(choices)
    for r in returns:
        c = r.choice
        expected = {**_group_part(c.group), "round": s(c.round_number), "round_complete": "True", "return_id": s(r.pk),
                    "choice_id": s(c.pk), "candidate_id": s(r.candidate_id), "candidate_seat": r.candidate.seat,
                    "candidate_kind": r.candidate.kind, "candidate_controller": r.candidate.controller,
                    "selector_id": s(c.selector_id), "selector_seat": c.selector.seat, "selector_kind": c.selector.kind,
                    "selector_controller": c.selector.controller, "sent": s(c.sent), "available": s(r.available),
                    "returned": s(r.returned), "return_ratio": s(r.returned / r.available if r.available else None),
                    "timed_out": s(r.timed_out), "decided_by": r.decided_by,
                    "decision_seconds": s(r.decision_seconds), "created_at": s(r.created_at)}
        assert rows[s(r.pk)] == expected

    # beliefs
    beliefs = list(Belief.objects.filter(group__session=played)
                   .select_related("group__condition", "group__session__experiment", "selector", "candidate"))
    rows = by(data["beliefs"], "belief_id")
    assert len(rows) == len(beliefs) == 2 * 3 * 4
    for b in beliefs:
        expected = {**_group_part(b.group), "round": s(b.round_number), "round_complete": "True", "belief_id": s(b.pk),
                    "selector_id": s(b.selector_id), "selector_seat": b.selector.seat, "selector_kind": b.selector.kind,
                    "selector_controller": b.selector.controller, "candidate_id": s(b.candidate_id),
                    "candidate_seat": b.candidate.seat, "candidate_kind": b.candidate.kind,
                    "candidate_controller": b.candidate.controller, "guess": b.guess,
                    "correct": s(b.guess == b.candidate.kind if b.guess else None), "confidence": s(b.confidence),
                    "timed_out": s(b.timed_out), "created_at": s(b.created_at)}
        assert rows[s(b.pk)] == expected
    assert {r["correct"] for r in rows.values()} == {"True", "False"}

    # questionnaire: one column per question
    answers = list(QuestionnaireResponse.objects.filter(participant__session=played).select_related("participant__group__condition"))
    rows = by(data["questionnaire"], "participant_id")
    assert len(rows) == len(answers) == 2 * 5
    for a in answers:
        p = a.participant
        expected = {"experiment": played.experiment.slug, "session_id": s(played.pk), "group_id": s(p.group_id),
                    "group_number": s(p.group.number), "condition": p.group.condition.name,
                        "society": p.group.society, "participant_id": s(p.pk),
                    "role": p.role, "seat": p.seat, "kind": p.kind,
                    **{q["id"]: s(a.answers[q["id"]]) for q in QUESTIONS}, "submitted_at": s(a.created_at)}
        assert rows[s(p.pk)] == expected

    # events: the full log, in order
    events = list(Event.objects.filter(session=played).select_related("group", "participant").order_by("id"))
    rows = data["events"]
    assert [r["event_id"] for r in rows] == [s(e.pk) for e in events]
    for row, e in zip(rows, events, strict=True):
        assert row == {"event_id": s(e.pk), "experiment": played.experiment.slug, "session_id": s(played.pk),
                       "group_id": s(e.group_id), "group_number": s(e.group.number if e.group else None),
                       "participant_id": s(e.participant_id), "participant_seat": e.participant.seat if e.participant else "",
                       "actor_id": s(e.actor_id), "type": e.type, "round": s(e.round_number), "phase": e.phase,
                       "payload": row["payload"], "created_at": s(e.created_at)}
        assert json.loads(row["payload"]) == e.payload

    # llm_calls: every call of the session, none from elsewhere (the admin's profile test has no session)
    rows = by(data["llm_calls"], "llm_call_id")
    assert set(rows) == {s(c.pk) for c in calls}
    for c in type(calls[0]).objects.filter(pk__in=[c.pk for c in calls]).select_related("group__condition", "participant",
                                                                                       "decision"):
        g = c.group
        assert rows[s(c.pk)] == {
            **_group_part(g), "llm_call_id": s(c.pk), "participant_id": s(c.participant_id), "seat": c.participant.seat,
            "round": s(c.round_number), "phase": c.phase, "decision_id": s(c.decision_id), "attempt": s(c.attempt),
            "throttled": s(c.throttled), "purpose": c.purpose, "profile": "test profile",
            "memory": c.decision.memory if c.decision else "", "memory_rounds": s(c.decision.memory_rounds if c.decision else None),
            "model": c.model, "model_reported": c.model_reported,
            "parameters": json.dumps(c.parameters), "request_messages": json.dumps(c.request_messages),
            "response_format": "", "raw_reply": c.raw_reply, "refusal": "",
            "parsed": json.dumps(c.parsed) if c.parsed is not None else "", "tokens_in": s(c.tokens_in),
            "tokens_out": s(c.tokens_out), "latency_ms": s(c.latency_ms), "cost": s(c.cost), "http_status": s(c.http_status),
            "error_class": c.error_class, "error_message": c.error_message, "status": c.status, "applied": s(c.applied),
            "created_at": s(c.created_at), "finished_at": s(c.finished_at)}


def test_scopes_session_experiment_everything() -> None:
    first = playthrough.session_played()
    other = factories.session_create(first.experiment, capacity=20)
    group = playthrough.people_join(other, first.experiment.n_humans, prefix="PO")[0]
    group.refresh_from_db()
    playthrough.play(group.group, until=(2, "pitch"))
    elsewhere = playthrough.session_played()  # another experiment

    def n_choices(scope: Scope) -> int:
        return len(tables(bundle(scope, Options()))["choices"])

    per_session = {x.pk: Choice.objects.filter(group__session=x).count() for x in (first, other, elsewhere)}
    assert n_choices(Scope.session(first.pk)) == per_session[first.pk]
    assert n_choices(Scope.experiment(first.experiment.slug)) == per_session[first.pk] + per_session[other.pk]
    assert n_choices(Scope.everything()) == sum(per_session.values())
    assert n_choices(Scope.for_sessions([first.pk, elsewhere.pk])) == per_session[first.pk] + per_session[elsewhere.pk]
    rows = tables(bundle(Scope.experiment(first.experiment.slug), Options()))["participants"]
    assert {r["session_id"] for r in rows} == {s(first.pk), s(other.pk)}


def test_bad_scope_and_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(export.ExportError, match="No session with id 424242"):
        Scope.session(424242)
    with pytest.raises(export.ExportError, match='No experiment with slug "nope"'):
        Scope.experiment("nope")
    with pytest.raises(export.ExportError, match="Format must be one of csv, jsonl"):
        Options(format="xlsx")  # type: ignore[arg-type]
    with pytest.raises(CommandError, match="No session"):
        call_command("export", session=424242, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- a running session --------------------------------------------------------------------------------

def test_running_session_export_marks_incomplete_rounds() -> None:
    session = playthrough.session_played(until_second=(2, "return"))
    running = session.groups.get(status="playing")
    assert (running.round_number, running.phase) == (2, "return")
    data = tables(bundle(Scope.session(session.pk), Options()))
    choices = [r for r in data["choices"] if r["group_id"] == s(running.pk)]
    assert {(r["round"], r["round_complete"]) for r in choices} == {("1", "True"), ("2", "False")}
    for r in choices:
        if r["round"] == "2":
            # Chosen but not yet settled: what is not decided yet is empty, not zero.
            assert r["selector_payoff"] == "" and r["candidate_id"] != ""
        else:
            assert r["selector_payoff"] != "" and r["returned"] != ""
    pending = [r for r in choices if r["round"] == "2" and r["returned"] == ""]
    assert pending and all(r["return_ratio"] == "" and r["candidate_earned"] == "" for r in pending)
    assert {r["round_complete"] for r in data["messages"] if r["group_id"] == s(running.pk) and r["round"] == "2"} == {"False"}
    finished = [r for r in data["choices"] if r["group_id"] != s(running.pk)]
    assert finished and {r["round_complete"] for r in finished} == {"True"}
    statuses = {r["status"] for r in data["participants"] if r["group_id"] == s(running.pk)}
    assert statuses == {"playing"}


# ---- the codebook ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("recruitment", ["include", "pseudonymise", "omit"])
def test_codebook_covers_every_exported_column_and_nothing_else(played: Session, fmt: str, recruitment: str) -> None:
    files = bundle(Scope.session(played.pk), Options(format=fmt, recruitment=recruitment))  # type: ignore[arg-type]
    book = json.loads(files["codebook.json"])
    assert set(files) == {e["file"] for e in book["tables"]} | BUNDLE_EXTRAS
    markdown = files["codebook.md"].decode()
    for entry in book["tables"]:
        names = [c["name"] for c in entry["columns"]]
        text = files[entry["file"]].decode()
        if fmt == "csv":
            header = next(csv.reader(io.StringIO(text)))
            assert header == names
            assert entry["rows"] == len(list(csv.DictReader(io.StringIO(text))))
        else:
            records = [json.loads(line) for line in text.splitlines()]
            assert entry["rows"] == len(records)
            for record in records:
                assert list(record) == names
        for c in entry["columns"]:
            assert c["type"] in export.TYPES and c["meaning"] and c["meaning"] != "."
        section = markdown.split(f"## `{entry['file']}`")[1].split("\n## ")[0]
        assert re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE) == names
    recruitment_columns = {"prolific_pid", "study_id", "recruitment_session_id"}
    participants = {c["name"] for c in book["tables"][0]["columns"]}
    assert (recruitment_columns <= participants) == (recruitment != "omit")


def test_jsonl_rows_are_typed_and_nest_json_columns(played: Session) -> None:
    files = bundle(Scope.session(played.pk), Options(format="jsonl", recruitment="include"))
    choice = json.loads(files["choices.jsonl"].decode().splitlines()[0])
    stored = Choice.objects.get(pk=choice["choice_id"])
    assert choice["order"] == stored.order and isinstance(choice["sent"], int)
    assert choice["round_complete"] is True and isinstance(choice["candidate_is_bot"], bool)
    event = json.loads(files["events.jsonl"].decode().splitlines()[0])
    assert event["payload"] == Event.objects.get(pk=event["event_id"]).payload
    participant = json.loads(files["participants.jsonl"].decode().splitlines()[0])
    assert isinstance(participant["bonus"], float)


def test_committed_codebook_is_the_generated_one() -> None:
    committed = (Path(__file__).resolve().parents[2] / "docs" / "codebook.md").read_text(encoding="utf-8")
    assert committed == export.codebook_markdown(export.codebook()), \
        "docs/codebook.md is stale: run python manage.py codebook --out docs/codebook.md"


def test_every_column_meaning_comes_from_code(played: Session) -> None:
    """A stored field documented by its help_text shows that text: edit the model, the codebook follows."""
    columns = {c.name: c for c in export.columns_of(export.table("choices"))}
    assert columns["sent"].meaning == Choice._meta.get_field("sent").help_text
    assert columns["sent"].unit == "points" and columns["sent"].type == "integer"
    assert columns["chosen_at"].type == "datetime" and columns["chosen_at"].unit == "UTC"
    assert columns["selector_kind"].values == ("human", "bot")


# ---- privacy -------------------------------------------------------------------------------------------

def _recruitment_ids(session: Session) -> set[str]:
    ids = set()
    for p in session.participants.all():
        ids |= {v for v in (p.prolific_pid, p.study_id, p.recruitment_session_id) if v}
    return ids


def test_pseudonymised_export_contains_no_recruitment_id(played: Session) -> None:
    ids = _recruitment_ids(played)
    assert len(ids) > 10
    files = bundle(Scope.session(played.pk), Options(recruitment="pseudonymise"))
    everything = b"\n".join(files.values()).decode()
    assert not [i for i in ids if i in everything]
    rows = tables(files)["participants"]
    people = {s(p.pk): p for p in played.participants.all()}
    for row in rows:
        p = people[row["participant_id"]]
        assert row["prolific_pid"] == (export.pseudonym(p.prolific_pid) if p.prolific_pid else "")
        assert row["prolific_pid"] == "" or re.fullmatch(r"[0-9a-f]{16}", row["prolific_pid"])
    # Stable: the same id gives the same pseudonym in another export.
    again = tables(bundle(Scope.session(played.pk), Options(recruitment="pseudonymise")))["participants"]
    assert [r["prolific_pid"] for r in again] == [r["prolific_pid"] for r in rows]
    assert len({r["prolific_pid"] for r in rows if r["prolific_pid"]}) == len([p for p in people.values() if p.prolific_pid])


def test_recruitment_ids_only_when_asked_for(played: Session) -> None:
    ids = _recruitment_ids(played)
    default = b"\n".join(bundle(Scope.session(played.pk), Options()).values()).decode()
    assert not [i for i in ids if i in default]
    assert "prolific_pid" not in default.split("\n", 1)[0]
    staff = tables(bundle(Scope.session(played.pk), Options(recruitment="include")))["participants"]
    assert {r["prolific_pid"] for r in staff} - {""} == set(played.participants.exclude(prolific_pid="")
                                                           .values_list("prolific_pid", flat=True))
    assert not any(c.name == "token" for t in export.TABLES for c in export.columns_of(t))
    tokens = set(played.participants.values_list("token", flat=True))
    assert not [t for t in tokens if t in default]


# ---- the Prolific bonus file --------------------------------------------------------------------------------

def test_prolific_bonus_file(played: Session) -> None:
    text = export.prolific_bonus_csv(session_id=played.pk)
    lines = text.splitlines()
    assert text.endswith("\n") and lines
    for line in lines:
        assert re.fullmatch(r"[A-Za-z0-9._-]+,\d+\.\d{2}", line), line
    paid = {pid: amount for pid, amount in (line.split(",") for line in lines)}
    expected = {p.prolific_pid: f"{services.bonus_of(p):.2f}"
                for p in played.participants.exclude(prolific_pid="").select_related("session__experiment")
                if services.bonus_of(p) > 0}
    assert paid == expected
    # Only people with a recruitment id and something to pay: no bots, no decliners, nobody left in the lobby.
    assert "PDECLINE" not in paid and "PWAIT000" not in paid
    assert len(paid) == 2 * 5
    with pytest.raises(export.ExportError):
        export.prolific_bonus_csv(session_id=999999)


# ---- the management command ------------------------------------------------------------------------

def test_export_command_writes_a_zip_and_loose_files(played: Session, tmp_path: Path) -> None:
    call_command("export", session=played.pk, out=tmp_path / "zip", pseudonymise=True, stdout=io.StringIO())
    (archive,) = (tmp_path / "zip").iterdir()
    assert archive.name.startswith(f"partnerlab-session-{played.pk}-csv-") and archive.suffix == ".zip"
    with zipfile.ZipFile(archive) as z:
        assert set(z.namelist()) == {f"{t.name}.csv" for t in ALL_TABLES} | BUNDLE_EXTRAS
        assert not [i for i in _recruitment_ids(played) if i.encode() in z.read("participants.csv")]
    call_command("export", experiment=played.experiment.slug, out=tmp_path / "loose", format="jsonl", unzipped=True,
                 stdout=io.StringIO())
    assert {p.name for p in (tmp_path / "loose").iterdir()} == {f"{t.name}.jsonl" for t in ALL_TABLES} | BUNDLE_EXTRAS
    out = io.StringIO()
    call_command("export", all=True, out=tmp_path / "all", stdout=out)
    assert "choices" in out.getvalue() and f"{2 * 3 * playthrough.ROUNDS:>10} rows" in out.getvalue()


def _rezip(source: Path, target: Path, *, change: dict[str, bytes | None], add: dict[str, bytes] | None = None) -> None:
    """A copy of a bundle with some files replaced (bytes) or left out (None), and others added."""
    with zipfile.ZipFile(source) as z, zipfile.ZipFile(target, "w") as out:
        for name in z.namelist():
            data = change.get(name, z.read(name))
            if data is not None:
                out.writestr(name, data)
        for name, data in (add or {}).items():
            out.writestr(name, data)


def test_the_manifest_hashes_every_file_and_verify_export_names_what_was_changed(played: Session, tmp_path: Path) -> None:
    import hashlib

    printed = io.StringIO()
    call_command("export", session=played.pk, out=tmp_path / "zip", stdout=printed)
    (bundle,) = (tmp_path / "zip").iterdir()
    with zipfile.ZipFile(bundle) as z:
        files = {n: z.read(n) for n in z.namelist()}
    manifest = json.loads(files["manifest.json"])
    assert set(manifest["files"]) == set(files) - {"manifest.json"} and manifest["scope"] == f"session-{played.pk}"
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256(files[name]).hexdigest() and entry["bytes"] == len(files[name])
    assert manifest["files"]["choices.csv"]["rows"] == files["choices.csv"].count(b"\n") - 1 == 2 * 3 * playthrough.ROUNDS
    recorded = hashlib.sha256(files["manifest.json"]).hexdigest()
    assert f"SHA-256 of manifest.json: {recorded}" in printed.getvalue()

    ok = io.StringIO()
    call_command("verify_export", str(bundle), manifest_sha256=recorded, stdout=ok)
    assert f"all {len(manifest['files'])} files match" in ok.getvalue()

    edited = files["choices.csv"].replace(b",True,", b",False,", 1)
    assert edited != files["choices.csv"]
    cases = [({"choices.csv": edited}, None, "choices.csv was changed"),
             ({"returns.csv": None}, None, "returns.csv is listed in the manifest but missing"),
             ({}, {"extra.csv": b"a,b\n"}, "extra.csv is in the bundle but not in the manifest"),
             ({"manifest.json": files["manifest.json"].replace(b'"scope"', b'"scope" ', 1)}, None,
              "manifest.json was changed")]
    for number, (change, add, message) in enumerate(cases):
        tampered = tmp_path / f"tampered-{number}.zip"
        _rezip(bundle, tampered, change=change, add=add)
        errors = io.StringIO()
        with pytest.raises(CommandError, match="does not match its manifest") as failure:
            call_command("verify_export", str(tampered), manifest_sha256=recorded, stderr=errors)
        assert failure.value.returncode == 1 and message in errors.getvalue(), (number, errors.getvalue())

    call_command("export", session=played.pk, out=tmp_path / "loose", unzipped=True, stdout=io.StringIO())
    call_command("verify_export", str(tmp_path / "loose"), stdout=io.StringIO())
    (tmp_path / "loose" / "pitches.csv").write_bytes(b"")
    with pytest.raises(CommandError, match="1 difference"):
        call_command("verify_export", str(tmp_path / "loose"), stderr=io.StringIO())
    (tmp_path / "notes.txt").write_text("hello")
    for path, message in ((tmp_path / "notes.txt", "neither a zip bundle nor a directory"),
                          (tmp_path / "nothing.zip", "does not exist"), (tmp_path / "zip", "has no manifest.json")):
        with pytest.raises(CommandError, match=message):
            call_command("verify_export", str(path), stderr=io.StringIO())
    _rezip(bundle, tmp_path / "garbled.zip", change={"manifest.json": b"{not json"})
    with pytest.raises(CommandError, match="is not a PartnerLab manifest"):
        call_command("verify_export", str(tmp_path / "garbled.zip"), stderr=io.StringIO())


def test_verify_closes_the_bundle_it_opened_even_when_it_fails(played: Session, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    call_command("export", session=played.pk, out=tmp_path / "zip", stdout=io.StringIO())
    (bundle,) = (tmp_path / "zip").iterdir()
    _rezip(bundle, tmp_path / "garbled.zip", change={"manifest.json": b"{not json"})
    opened: list[zipfile.ZipFile] = []

    class Tracked(zipfile.ZipFile):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(export.zipfile, "ZipFile", Tracked)
    assert export.verify_bundle(bundle)[1] == []
    with pytest.raises(export.ExportError, match="not a PartnerLab manifest"):
        export.verify_bundle(tmp_path / "garbled.zip")
    assert len(opened) == 2 and all(z.fp is None for z in opened)  # closed: a lab's script may delete or move it next


def test_codebook_command(tmp_path: Path) -> None:
    call_command("codebook", out=tmp_path / "codebook.md", stdout=io.StringIO())
    assert (tmp_path / "codebook.md").read_text() == export.codebook_markdown(export.codebook())
    call_command("codebook", out=tmp_path / "codebook.json", stdout=io.StringIO())
    assert json.loads((tmp_path / "codebook.json").read_text())["tables"][1]["name"] == "choices"


# ---- staff views -------------------------------------------------------------------------------------

@pytest.fixture
def staff() -> Client:
    user = get_user_model().objects.create_user("analyst", password="pw-analyst-123", is_staff=True)
    client = Client()
    client.force_login(user)
    return client


def _zip_of(response: Any) -> dict[str, bytes]:
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))) as z:
        return {n: z.read(n) for n in z.namelist()}


def test_staff_downloads(played: Session, staff: Client) -> None:
    files = _zip_of(staff.get(f"/staff/sessions/{played.pk}/export.zip"))
    assert len(tables(files)["choices"]) == 2 * 3 * playthrough.ROUNDS
    assert "prolific_pid" in files["participants.csv"].decode().splitlines()[0]  # staff export
    files = _zip_of(staff.get(f"/staff/sessions/{played.pk}/export.zip?pseudonymise=1&format=jsonl"))
    assert "participants.jsonl" in files and not [i for i in _recruitment_ids(played) if i.encode() in files["participants.jsonl"]]
    files = _zip_of(staff.get(f"/staff/experiments/{played.experiment.slug}/export.zip"))
    assert len(tables(files)["participants"]) == played.participants.count()
    assert staff.get(f"/staff/sessions/{played.pk}/export.zip?format=xlsx").status_code == 400
    assert staff.get("/staff/sessions/999999/export.zip").status_code == 404
    assert staff.get("/staff/experiments/nope/export.zip").status_code == 404

    response = staff.get(f"/staff/sessions/{played.pk}/bonus.csv")
    assert response.status_code == 200 and response.content.decode() == export.prolific_bonus_csv(session_id=played.pk)
    assert "attachment" in response["Content-Disposition"]


def test_staff_summary_pages(played: Session, staff: Client) -> None:
    for base in (f"/staff/sessions/{played.pk}/", f"/staff/experiments/{played.experiment.slug}/"):
        page = staff.get(base + "summary/")
        assert page.status_code == 200
        html = page.content.decode()
        assert "Share to bots" in html and "disclosed" in html and "hidden" in html
        summary_csv = staff.get(base + "summary.csv")
        assert summary_csv.status_code == 200 and summary_csv.content.decode().startswith("condition,disclosed,round,n_choices")
        assert staff.get(base + "summary.png").content.startswith(b"\x89PNG")
        assert staff.get(base + "summary.svg")["Content-Type"] == "image/svg+xml"
        assert staff.get(base + "beliefs.csv").content.decode().startswith("condition,round,true_kind")
        report = staff.get(base + "report/")
        assert report.status_code == 200 and b"<svg" in report.content


def test_staff_summary_pages_take_the_cluster_level_and_method(played: Session, staff: Client) -> None:
    base = f"/staff/sessions/{played.pk}/"
    page = staff.get(base + "summary/?cluster=selector").content.decode()
    assert "clustered by <strong>selector</strong>" in page
    assert f'href="{base}summary.csv?cluster=selector"' in page and f'href="{base}summary/"' in page  # group: default
    rows = list(csv.DictReader(io.StringIO(staff.get(base + "summary.csv?cluster=selector").content.decode())))
    assert rows and {r["cluster"] for r in rows} == {"selector"}
    beliefs = list(csv.DictReader(io.StringIO(staff.get(base + "beliefs.csv?cluster=session").content.decode())))
    assert {r["cluster"] for r in beliefs} <= {"session"}
    # The played session is too small for the regression to be sure to fit; a planted one always does.
    from tests.experiment.test_analysis import plant

    report = staff.get(f"/staff/sessions/{plant().pk}/report/?cluster=selector&inference=crve").content.decode()
    assert "Inference is clustered by selector" in report and "method: crve" in report and "<td>selector</td>" in report
    for query in ("cluster=table", "inference=magic", "cluster=%00"):
        bad = staff.get(base + "summary/?" + query)
        assert bad.status_code == 400 and b"must be one of" in bad.content, query


@pytest.mark.parametrize("url", ["/staff/sessions/{s}/export.zip", "/staff/sessions/{s}/summary/",
                                 "/staff/sessions/{s}/summary.csv", "/staff/sessions/{s}/bonus.csv",
                                 "/staff/experiments/{e}/export.zip", "/staff/experiments/{e}/report/"])
def test_staff_pages_refuse_others(played: Session, url: str) -> None:
    url = url.format(s=played.pk, e=played.experiment.slug)
    anonymous = Client().get(url)
    assert anonymous.status_code == 302 and "/admin/login/" in anonymous["Location"]
    user = get_user_model().objects.create_user("someone", password="pw-someone-123")
    client = Client()
    client.force_login(user)
    assert client.get(url).status_code == 302
    # A participant's seat cookie is no staff login either.
    seat = played.participants.exclude(token="").first()
    participant = Client()
    participant.get(f"/play/{seat.token}/")
    assert participant.get(url).status_code == 302


@pytest.mark.django_db(transaction=True)
async def test_download_streams_over_asgi() -> None:
    """Under ASGI the bundle is sent a chunk at a time, from the thread that owns the database cursor."""
    from asgiref.sync import sync_to_async

    @sync_to_async
    def setup() -> tuple[int, Any]:
        session = playthrough.session_played()
        user = get_user_model().objects.create_user("asgi-analyst", password="pw-asgi-123", is_staff=True)
        return session.pk, user

    try:
        session_id, user = await setup()
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.get(f"/staff/sessions/{session_id}/export.zip")
        assert response.status_code == 200 and response.is_async
        chunks = [chunk async for chunk in response.streaming_content]
        assert len(chunks) > 3
        with zipfile.ZipFile(io.BytesIO(b"".join(chunks))) as z:
            assert len(list(csv.DictReader(io.StringIO(z.read("choices.csv").decode())))) == 2 * 3 * playthrough.ROUNDS
    finally:
        # The test client keeps the request thread's connection open; close it so the test database can go.
        await sync_to_async(connections.close_all)()


# ---- PostgreSQL's text path writes what the typed path writes ------------------------------------------

def test_csv_from_postgres_text_equals_csv_from_typed_values(played: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("the text path exists on PostgreSQL only")
    _llm_calls_record(played)
    fast = bundle(Scope.session(played.pk), Options(recruitment="include"))
    monkeypatch.setattr(export, "_TEXT_CSV", False)
    typed = bundle(Scope.session(played.pk), Options(recruitment="include"))
    for name in fast:
        if name.endswith(".csv"):
            assert fast[name] == typed[name], name


def test_postgres_text_normalisation_matches_python_str() -> None:
    import datetime as dt

    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("the text path exists on PostgreSQL only")
    floats = [2.0, 0.1, 1 / 3, 2 / 3, 1e-05, 0.0001, 123.456, 1e15, 1e16, 123456789012345.6, 9007199254740993.0,
              -0.0, -2.5, 5e-324, 1.7976931348623157e308, 0.021711, 30.0]
    base = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    stamps = [base, base.replace(microsecond=500000), base.replace(microsecond=120000), base.replace(microsecond=1),
              base.replace(microsecond=999999), base.replace(year=1999, month=12, day=31, hour=23, minute=59, second=59)]
    import psycopg
    from psycopg.types.string import TextLoader

    connection.ensure_connection()
    with psycopg.Cursor(connection.connection) as cursor:
        for name in ("float8", "timestamptz", "bool"):  # read PostgreSQL's own text, as the export does
            cursor.adapters.register_loader(name, TextLoader)
        cursor.execute("SELECT v FROM unnest(%s::float8[]) AS v", [floats])
        assert [export._float_text(v) for (v,) in cursor.fetchall()] == [repr(f) for f in floats]
        cursor.execute("SELECT v FROM unnest(%s::timestamptz[]) AS v", [stamps])
        assert [export._timestamp_text(v) for (v,) in cursor.fetchall()] == [str(s) for s in stamps]
        cursor.execute("SELECT v FROM unnest(ARRAY[true, false]) AS v")
        assert [export._bool_text(v) for (v,) in cursor.fetchall()] == ["True", "False"]


def test_functions_for_admin_actions(played: Session) -> None:
    from django.test import RequestFactory

    from experiment import staff_views

    request = RequestFactory().get("/admin/")
    response = staff_views.sessions_bundle_response(session_ids=Session.objects.filter(pk=played.pk).values_list("pk", flat=True),
                                                    request=request)
    files = _zip_of(response)
    assert len(tables(files)["participants"]) == played.participants.count()
    response = staff_views.experiments_bundle_response(experiment_ids=[played.experiment_id], request=request,
                                                       pseudonymise=True, fmt="jsonl")
    files = _zip_of(response)
    everything = b"".join(files.values())
    assert "participants.jsonl" in files and not [i for i in _recruitment_ids(played) if i.encode() in everything]
    bonus = staff_views.prolific_bonus_response(session_id=played.pk)
    assert bonus.content.decode() == export.prolific_bonus_csv(session_id=played.pk)
    with pytest.raises(export.ExportError):
        staff_views.sessions_bundle_response(session_ids=[], request=request)
