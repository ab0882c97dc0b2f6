"""How much the live monitor costs with 100 running groups (issue: "the monitor holds 100 groups").

Builds 100 groups of the default design in a dedicated PostgreSQL database, then measures:
- the full overview a monitor receives on connect (``session_overview``);
- one coalesced update in which every group changed at once (100 × ``group_summary_by_id``);
- the latency of a participant action (``pitch_submit``) with and without the monitor's
  notifications (they are sent either way; what matters is that the action path stays flat).

Usage: .venv/bin/python bench/monitor.py [--groups 100] [--database-url postgres://postgres@127.0.0.1:5432/partnerlab_monitor_bench]
Drops and recreates the database it is given; targets 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _recreate(url: str) -> None:
    import psycopg

    parsed = urlparse(url)
    name = parsed.path.lstrip("/")
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')


def _drop(url: str) -> None:
    import psycopg

    name = urlparse(url).path.lstrip("/")
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/partnerlab_monitor_bench")
    args = parser.parse_args()
    _recreate(args.database_url)
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "config.settings.production", "DJANGO_SECRET_KEY": "bench-only-" + "x" * 50,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1", "DATABASE_URL": args.database_url, "REDIS_URL": "redis://127.0.0.1:6379/9",
    })
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    settings.PARTNERLAB_SCHEDULER = "inprocess"  # jobs just queue up: nothing runs the clock during the benchmark
    try:
        call_command("migrate", verbosity=0)
        _run(args.groups)
    finally:
        from django.db import connections

        connections.close_all()
        _drop(args.database_url)


def _timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def _run(n_groups: int) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from experiment import services
    from experiment.models import Condition, Experiment, Participant, Session
    from experiment.monitor import group_summary_by_id, session_overview

    # Long phases: building the groups must not outlast the first phase on a loaded machine.
    experiment = Experiment.objects.create(name="Monitor bench", slug="monitor-bench", pitch_seconds=3600)
    Condition.objects.create(experiment=experiment, name="hidden")
    Condition.objects.create(experiment=experiment, name="disclosed", disclose_identity=True)
    session = Session.objects.create(experiment=experiment, capacity=n_groups * experiment.n_humans)
    start = time.perf_counter()
    quiz = {str(i): q["answer"] for i, q in enumerate(experiment.quiz)}
    for _ in range(n_groups * experiment.n_humans):
        p = services.participant_join(session_id=session.pk)
        services.consent_submit(participant_id=p.pk, accept=True)
        services.instructions_done(participant_id=p.pk)
        services.quiz_submit(participant_id=p.pk, answers=quiz)
    print(f"built {session.groups.count()} groups ({Participant.objects.count()} seats) in {time.perf_counter() - start:.1f} s")

    with CaptureQueriesContext(connection) as queries:
        session_overview(session.pk)
    overview = _timed(lambda: session_overview(session.pk), 5)
    print(f"overview on connect ({n_groups} groups): median {statistics.median(overview):.0f} ms, "
          f"{len(queries)} queries")
    group_ids = list(session.groups.values_list("pk", flat=True))
    flush = _timed(lambda: [group_summary_by_id(g) for g in group_ids], 3)
    print(f"update with all {n_groups} groups changed: median {statistics.median(flush):.0f} ms "
          f"({statistics.median(flush) / n_groups:.1f} ms per group)")

    candidates = list(Participant.objects.filter(session=session, role="candidate", controller="person")[:200])
    latencies = []
    for p in candidates:
        start = time.perf_counter()
        services.pitch_submit(participant_id=p.pk, round_number=1, text="I will return half, promise.")
        latencies.append((time.perf_counter() - start) * 1000)
    latencies.sort()
    print(f"pitch_submit with monitor notifications ({len(latencies)} actions): p50 {latencies[len(latencies) // 2]:.1f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99) - 1]:.1f} ms")


if __name__ == "__main__":
    main()
