"""``manage.py simulate`` against the built-in server (a real uvicorn process) and the load benchmark's
machinery against the production stack. Synthetic participants join over HTTP and play over real
websockets; nothing here writes a decision into the database directly."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from experiment.models import Choice, Group, Message, Participant, QuestionnaireResponse, Return, RoundPayoff, Session
from experiment.simulation import session_tables
from tests import factories

pytestmark = [pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 2
# Long enough that synthetic humans (at most 60 % into a phase) and scripted bots always act in time,
# even on a busy machine; the feedback phase is short to keep the test quick.
PHASES = {"pitch_seconds": 5, "choice_seconds": 5, "return_seconds": 5, "feedback_seconds": 1, "belief_seconds": 5}


def _port() -> int | None:
    """A port from PARTNERLAB_TEST_PORTS ("8601-8619") when set, else any free port."""
    spec = os.environ.get("PARTNERLAB_TEST_PORTS")
    if not spec:
        return None
    first, _, last = spec.partition("-")
    for port in range(int(first), int(last or first) + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {spec}")


@pytest.fixture
def shareable_database():
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3") and str(db["NAME"]) in ("", ":memory:"):
        pytest.skip("the built-in server runs in its own process and cannot share an in-memory SQLite database")


def _experiment():
    return factories.experiment_create(n_rounds=ROUNDS, belief_rounds="last", **PHASES)


def _simulate(experiment, *, groups: int, seed: int) -> dict:
    out = io.StringIO()
    call_command("simulate", experiment=experiment.slug, groups=groups, seed=seed, time_scale=0.02, port=_port(),
                 json=True, stdout=out)
    return json.loads(out.getvalue())


def test_two_groups_play_to_the_end_and_store_every_decision(shareable_database) -> None:
    experiment = _experiment()
    summary = _simulate(experiment, groups=2, seed=11)

    assert summary["errors"] == 0, summary["error_examples"]
    assert summary["groups_completed"] == 2 and summary["groups_stalled"] == []
    assert summary["clients"] == 10 and summary["clients_by_stage"] == {"finished": 10}
    assert summary["rounds"] == 2 * ROUNDS
    session = Session.objects.get(code=summary["session"])
    assert session.seed == 11
    groups = list(Group.objects.filter(session=session))
    assert len(groups) == 2 and all(g.status == Group.Status.FINISHED for g in groups)
    # 3 selectors, 4 candidates (2 of them scripted bots) per group; belief in the last round only.
    choices = Choice.objects.filter(group__session=session)
    assert choices.count() == 2 * 3 * ROUNDS
    assert Return.objects.filter(choice__group__session=session).count() == choices.exclude(candidate=None).count()
    assert Message.objects.filter(group__session=session).count() == 2 * 4 * ROUNDS
    assert RoundPayoff.objects.filter(participant__session=session).count() == 2 * 7 * ROUNDS
    assert summary["stored"]["beliefs"] == 2 * 3 * 4
    people = Participant.objects.filter(session=session, controller=Participant.Controller.PERSON)
    assert people.count() == 10 and set(people.values_list("status", flat=True)) == {Participant.Status.FINISHED}
    assert QuestionnaireResponse.objects.filter(participant__session=session).count() == 10
    # Every human decision went over the websocket: the client counted an ack for each stored one.
    human_decisions = (Choice.objects.filter(group__session=session, timed_out=False).count()
                       + Message.objects.filter(group__session=session, timed_out=False,
                                                candidate__controller=Participant.Controller.PERSON).count()
                       + Return.objects.filter(choice__group__session=session, timed_out=False,
                                               candidate__controller=Participant.Controller.PERSON).count()
                       + 2 * 3)  # one belief submission per selector
    assert summary["decisions"] == human_decisions
    assert summary["ack_ms"]["n"] >= summary["decisions"] and summary["phase_change_ms"]["n"] > 0


def test_same_seed_same_decisions_and_payoffs(shareable_database) -> None:
    experiment = _experiment()
    first = _simulate(experiment, groups=2, seed=23)
    second = _simulate(experiment, groups=2, seed=23)
    assert first["errors"] == second["errors"] == 0
    a = session_tables(session_id=Session.objects.get(code=first["session"]).pk)
    b = session_tables(session_id=Session.objects.get(code=second["session"]).pk)
    assert len(a["choices"]) == 2 * 3 * ROUNDS and len(a["payoffs"]) == 2 * 7 * ROUNDS
    for table in ("choices", "messages", "beliefs", "payoffs", "seats"):
        assert a[table] == b[table], table
    # Not trivially equal: the two groups of one run play differently.
    by_group = {g: [row[2:] for row in a["choices"] if row[0] == g] for g in (1, 2)}
    assert by_group[1] != by_group[2]


def test_unknown_experiment_is_a_clear_error() -> None:
    with pytest.raises(CommandError, match="No experiment with slug 'nope'"):
        call_command("simulate", experiment="nope", groups=1)


def test_bad_behaviour_option_is_a_clear_error_and_creates_nothing() -> None:
    experiment = _experiment()
    with pytest.raises(CommandError, match="dropout must be between 0 and 1"):
        call_command("simulate", experiment=experiment.slug, groups=1, behaviour=["dropout=3"])
    assert not Session.objects.filter(experiment=experiment).exists()


@pytest.mark.production_stack
def test_load_benchmark_machinery(production_services) -> None:
    """bench/load.py end to end at toy size: uvicorn workers, Celery with beat, its own database and Redis db."""
    database = "partnerlab_load_smoke"
    port = _port() or 8611
    done = subprocess.run(
        [sys.executable, "bench/load.py", "--participants", "15", "--rounds", "1", "--phase-seconds", "5",
         "--time-scale", "0.05", "--ramp-seconds", "1", "--duration-limit", "300", "--port", str(port),
         "--database", database, "--redis-db", "14", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=420, check=False)
    assert done.returncode in (0, 2), f"{done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout)
    assert report["errors"] == 0, report["error_examples"]
    # Participants are seats, human or bot: 15 make two whole groups of 7 (5 synthetic humans and 2 bots each).
    assert {k: report["config"][k] for k in ("participants", "synthetic_humans", "bot_seats", "groups")} == {
        "participants": 14, "synthetic_humans": 10, "bot_seats": 4, "groups": 2}
    assert report["groups_stalled"] == [] and report["groups_completed"] == 2
    assert report["clients_by_stage"] == {"finished": 10}
    assert report["stored"]["choices"] == 2 * 3 and report["stored"]["messages"] == 2 * 4
    assert report["ack_ms"]["n"] >= 10 * 4 and report["phase_change_ms"]["n"] > 0
    assert report["cpu"]["uvicorn_cores"] > 0 and report["cpu"]["celery_cores"] > 0
    # It cleaned up after itself.
    with psycopg.connect("postgres://postgres@127.0.0.1:5432/postgres") as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is None
