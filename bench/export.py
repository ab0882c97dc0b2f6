"""Export benchmark: 1,000,000 choice rows in PostgreSQL, exported by PartnerLab vs PostgreSQL's own COPY.

Builds one finished session in a dedicated database (25,000 groups × 4 selectors × 10 rounds = 1,000,000
choices, each with its return and round payoffs; participants through the ORM, the big tables with
``INSERT … SELECT`` on the server), then measures, each in a fresh process (so peak RSS is the
measurement's own):

- ``copy``: ``COPY (<the choices table's export query>) TO STDOUT WITH (FORMAT csv)`` written to a file:
  the same rows and columns, computed by the same SQL, with PostgreSQL doing the CSV formatting;
- ``copy-bare``: ``COPY experiment_choice TO STDOUT`` (the raw table, for scale);
- ``csv``: ``choices.csv`` as the export writes it (server-side cursor, chunks, Python's csv module);
- ``zip``: ``choices.csv`` deflated into a zip entry, as in the bundle;
- ``bundle``: the whole bundle of the session (every table + codebook), as the download streams it.

Targets (issue "Data out"): the export ≤ 3 × the time of COPY, ≤ 200 MB peak RSS.

Usage: .venv/bin/python bench/export.py [--rows 1000000] [--database-url postgres://postgres@127.0.0.1:5432/partnerlab_bench] [--keep]
Drops and recreates the database it is given (and drops it at the end unless --keep); 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SELECTORS, CANDIDATES, ROUNDS = 4, 4, 10


def _admin_url(url: str) -> str:
    return url.rsplit("/", 1)[0] + "/postgres"


def _recreate(url: str) -> None:
    import psycopg

    name = urlparse(url).path.lstrip("/")
    with psycopg.connect(_admin_url(url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def _drop(url: str) -> None:
    import psycopg

    name = urlparse(url).path.lstrip("/")
    with psycopg.connect(_admin_url(url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _django(url: str) -> None:
    if urlparse(url).hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit("The benchmark only runs against a local database (127.0.0.1).")
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "config.settings.production", "DJANGO_SECRET_KEY": "bench-only-" + "x" * 50,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1", "DATABASE_URL": url, "REDIS_URL": "redis://127.0.0.1:6379/9",
    })
    import django

    django.setup()


# ---- building the data -------------------------------------------------------------------------------

def build(rows: int) -> int:
    """Create the session with ``rows`` choices; returns the session id."""
    from django.core.management import call_command
    from django.db import connection

    from experiment.models import Condition, Experiment, Group, Participant, Session

    per_group = SELECTORS * ROUNDS
    if rows % per_group:
        raise SystemExit(f"--rows must be a multiple of {per_group} (selectors × rounds).")
    n_groups = rows // per_group
    call_command("migrate", verbosity=0)
    experiment = Experiment.objects.create(name="Export benchmark", slug="export-bench", n_selectors=SELECTORS,
                                           n_candidates=CANDIDATES, n_bot_candidates=2, n_rounds=ROUNDS)
    conditions = [Condition.objects.create(experiment=experiment, name="hidden", disclose_identity=False),
                  Condition.objects.create(experiment=experiment, name="disclosed", disclose_identity=True)]
    session = Session.objects.create(experiment=experiment, label="bench", capacity=n_groups * 6)
    started = time.perf_counter()
    Group.objects.bulk_create([Group(session=session, condition=conditions[i % 2], number=i + 1, status="finished",
                                     round_number=ROUNDS, phase="feedback") for i in range(n_groups)], batch_size=5000)
    group_ids = list(Group.objects.filter(session=session).order_by("number").values_list("pk", flat=True))
    batch: list[Participant] = []
    for n, group_id in enumerate(group_ids):
        for i in range(SELECTORS):
            batch.append(Participant(session=session, group_id=group_id, role="selector", seat=f"S{i + 1}",
                                     kind="human", status="finished", prolific_pid=f"P{n:06d}{i}"))
        for i, seat in enumerate("ABCD"):
            bot = i in ((n % 4), (n + 1) % 4)
            batch.append(Participant(session=session, group_id=group_id, role="candidate", seat=seat,
                                     kind="bot" if bot else "human", controller="scripted" if bot else "person",
                                     status="finished"))
        if len(batch) >= 8000:
            Participant.objects.bulk_create(batch)
            batch = []
    Participant.objects.bulk_create(batch)
    print(f"  groups and participants: {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    with connection.cursor() as cursor:
        # Selector i in round r chooses candidate (i + r + group) mod 4 and sends (i + 2r) mod 11.
        cursor.execute("""
            INSERT INTO experiment_choice (group_id, round_number, selector_id, candidate_id, position, "order",
                                           label_shown, sent, multiplied, timed_out, decided_by, decision_seconds,
                                           created_at)
            SELECT s.group_id, r, s.id, c.id, 1 + (r %% 4), '["A", "B", "C", "D"]'::jsonb,
                   CASE WHEN cond.disclose_identity THEN CASE WHEN c.kind = 'bot' THEN 'AI bot' ELSE 'Human' END ELSE '' END,
                   (substr(s.seat, 2)::int + 2 * r) %% 11, 3 * ((substr(s.seat, 2)::int + 2 * r) %% 11), false,
                   'person', 2 + (s.id %% 37) * 0.7, now() - interval '1 day' + r * interval '2 minutes'
            FROM experiment_participant s
            CROSS JOIN generate_series(1, %s) AS r
            JOIN experiment_group g ON g.id = s.group_id
            JOIN experiment_condition cond ON cond.id = g.condition_id
            JOIN experiment_participant c ON c.group_id = s.group_id AND c.role = 'candidate'
                 AND c.seat = chr(65 + ((substr(s.seat, 2)::int + r + g.number) %% 4))
            WHERE s.session_id = %s AND s.role = 'selector'
        """, [ROUNDS, session.pk])
        cursor.execute("""
            INSERT INTO experiment_return (choice_id, candidate_id, available, returned, timed_out, decided_by,
                                           decision_seconds, created_at)
            SELECT ch.id, ch.candidate_id, ch.multiplied, ch.multiplied / 2, false, c.controller, 1.5, ch.created_at + interval '30 seconds'
            FROM experiment_choice ch JOIN experiment_group g ON g.id = ch.group_id
            JOIN experiment_participant c ON c.id = ch.candidate_id WHERE g.session_id = %s
        """, [session.pk])
        cursor.execute("""
            INSERT INTO experiment_roundpayoff (participant_id, round_number, points)
            SELECT ch.selector_id, ch.round_number, 10 - ch.sent + rt.returned
            FROM experiment_choice ch JOIN experiment_return rt ON rt.choice_id = ch.id
            JOIN experiment_group g ON g.id = ch.group_id WHERE g.session_id = %s
        """, [session.pk])
        cursor.execute("ANALYZE")
    print(f"  choices, returns, payoffs: {time.perf_counter() - started:.1f} s", flush=True)
    return session.pk


# ---- the measurements (each in its own process) ----------------------------------------------------------

def measure(kind: str, session_id: int, out: Path) -> dict[str, float]:
    from django.db import connection

    from experiment import export
    from experiment.export import Options, Scope

    scope = Scope.session(session_id)
    options = Options(recruitment="include")
    choices = export.table("choices")
    started = time.perf_counter()
    with open(out, "wb") as f:
        if kind in ("copy", "copy-bare"):
            if kind == "copy":
                sql, params = export._plan(choices, scope, options).queryset.query.sql_with_params()
                with connection.cursor() as cursor:
                    # Django's psycopg cursor binds on the client, so the query can be inlined into COPY.
                    query = cursor.mogrify(sql, params)
            else:
                query = "SELECT * FROM experiment_choice"
            with connection.cursor() as cursor, cursor.cursor.copy(f"COPY ({query}) TO STDOUT WITH (FORMAT csv, HEADER)") as copy:
                for data in copy:
                    f.write(data)
        elif kind == "csv":
            for chunk in export.encoded_chunks(choices, scope=scope, options=options):
                f.write(chunk)
        elif kind == "zip":
            import zipfile

            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=export.ZIP_LEVEL) as archive, \
                    archive.open("choices.csv", "w", force_zip64=True) as entry:
                for chunk in export.encoded_chunks(choices, scope=scope, options=options):
                    entry.write(chunk)
        elif kind == "bundle":
            for chunk in export.bundle_stream(scope=scope, options=options):
                f.write(chunk)
        else:
            raise SystemExit(f"unknown measurement {kind}")
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": peak_mb, "bytes": out.stat().st_size}


def _child(kind: str, session_id: int, url: str, out: Path) -> dict[str, float]:
    result = subprocess.run([sys.executable, __file__, "--database-url", url, "--measure", kind, "--session", str(session_id),
                             "--output", str(out)], capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{kind} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/partnerlab_bench")
    parser.add_argument("--keep", action="store_true", help="Keep the database afterwards.")
    parser.add_argument("--repeat", type=int, default=2, help="Runs of each measurement (the fastest counts).")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--session", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:  # child process
        _django(args.database_url)
        print(json.dumps(measure(args.measure, args.session, args.output)))
        return

    print(f"Building {args.rows:,} choice rows in {urlparse(args.database_url).path.lstrip('/')} …", flush=True)
    _recreate(args.database_url)
    try:
        _django(args.database_url)
        session_id = build(args.rows)
        from django.db import connections

        connections.close_all()
        results: dict[str, dict[str, float]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for kind in ("copy", "csv", "zip", "copy-bare", "bundle"):
                runs = [_child(kind, session_id, args.database_url, Path(tmp) / f"{kind}.out") for _ in range(args.repeat)]
                results[kind] = min(runs, key=lambda r: r["seconds"])
                best = results[kind]
                print(f"  {kind:<10} {best['seconds']:7.2f} s  peak RSS {best['peak_rss_mb']:6.1f} MB  "
                      f"{best['bytes'] / 1e6:8.1f} MB written", flush=True)
        copy = results["copy"]["seconds"]
        print()
        print(f"choices.csv, {args.rows:,} rows: export {results['csv']['seconds']:.2f} s vs COPY of the same query "
              f"{copy:.2f} s = {results['csv']['seconds'] / copy:.2f} × (target ≤ 3 ×); "
              f"peak RSS {results['csv']['peak_rss_mb']:.0f} MB (target ≤ 200 MB)")
        print(f"choices.csv deflated into the zip: {results['zip']['seconds']:.2f} s = {results['zip']['seconds'] / copy:.2f} × COPY; "
              f"peak RSS {results['zip']['peak_rss_mb']:.0f} MB")
        print(f"whole bundle (all tables of the session: {args.rows:,} choices and returns, "
              f"{args.rows // SELECTORS // ROUNDS * (SELECTORS + CANDIDATES):,} participants, codebook): "
              f"{results['bundle']['seconds']:.2f} s, {results['bundle']['bytes'] / 1e6:.0f} MB; "
              f"peak RSS {results['bundle']['peak_rss_mb']:.0f} MB")
        ok = results["csv"]["seconds"] <= 3 * copy and max(r["peak_rss_mb"] for r in results.values()) <= 200
        print("targets met" if ok else "TARGETS MISSED")
    finally:
        from django.db import connections

        connections.close_all()
        if not args.keep:
            _drop(args.database_url)


if __name__ == "__main__":
    main()
