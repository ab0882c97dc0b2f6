"""Benchmark: AI-only societies end to end, every turn through the real path.

Starts, on 127.0.0.1 only: its own redis-server (a port of its own, nothing kept), a dedicated PostgreSQL
database (created, migrated, dropped), Celery with ``config.settings.production`` as docs/deployment.md runs
it (a worker for phases and deadlines, a worker with a thread pool for the ``llm`` queue, beat), and the fake
OpenAI-compatible server (``bots.fake_openai``, real HTTP, ``--latency`` s per reply, 1.0 by default). Then
it starts AI-only groups with :func:`experiment.services.society_start`, as the cockpit and ``manage.py
society`` do, and measures from the database. Each turn is the production one: a Celery task renders the seat's
view, calls the model through the ``openai`` client, stores the call and the decision in PostgreSQL, applies
it through the game services (which store the row and the event, broadcast, and open the next phase when the
last decision is in).

Scenarios:

- ``phase`` (default ``--groups 125``: 4 candidates each, 500 LLM pitches due in the same phase): the groups
  are seated in one transaction, so their first phase opens for all of them at its commit. Reported: when
  the 500 decisions were stored and when every group's next phase opened, counted from that commit (and from
  the phase opening each group recorded, which is earlier by the time the transaction took to seat them).
  Target: every next phase open within 1.2 × the latency.
- ``scale`` (default ``--groups 1000 --rounds 3``): every group plays every round. Reported: groups finished,
  errors (failed LLM calls, defaults applied, refused actions, groups not finished), decisions stored per
  second, and the CPU of each process kind.

    .venv/bin/python bench/society.py --scenario phase
    .venv/bin/python bench/society.py --scenario scale --json

Exit status 0 when the scenario's targets are met, 1 when not, 3 when the stack could not be started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import (  # noqa: E402
    HOST,
    CpuMeter,
    Proc,
    _port_free,
    _recreate_database,
    close_run,
    machine,
    run_step,
)

SCENARIOS = {"phase": {"groups": 125, "rounds": 1}, "scale": {"groups": 1000, "rounds": 3}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="phase")
    p.add_argument("--groups", type=int, help="AI-only groups (default: the scenario's).")
    p.add_argument("--rounds", type=int, help="Rounds per group (default: the scenario's).")
    p.add_argument("--latency", type=float, default=1.0, help="Seconds the fake model takes per reply.")
    p.add_argument("--phase-seconds", type=int, default=60, help="Length of the decision phases (their deadline).")
    p.add_argument("--llm-threads", type=int, default=200, help="Threads of the LLM worker (--pool threads).")
    p.add_argument("--llm-workers", type=int, default=1, help="LLM worker processes (each with --llm-threads).")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432", help="PostgreSQL server (no database).")
    p.add_argument("--database", default="partnerlab_society_bench", help="Database created and dropped for the run.")
    p.add_argument("--redis-port", type=int, default=6391)
    p.add_argument("--time-limit", type=float, default=1800, help="Give up waiting after this many seconds.")
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args(argv)
    defaults = SCENARIOS[args.scenario]
    args.groups = args.groups or defaults["groups"]
    args.rounds = args.rounds or defaults["rounds"]
    return args


def _argv(name: str, args: argparse.Namespace, work: Path, index: int = 0) -> list[str]:
    py = sys.executable
    return {
        "redis": ["redis-server", "--port", str(args.redis_port), "--bind", HOST, "--save", "", "--appendonly", "no"],
        "worker": [py, "-m", "celery", "-A", "config", "worker", "--concurrency", "2", "--loglevel", "WARNING",
                   "--without-gossip", "--without-mingle", "-n", f"society-{os.getpid()}@%h"],
        "llm": [py, "-m", "celery", "-A", "config", "worker", "-Q", "llm", "--pool", "threads", "--concurrency",
                str(args.llm_threads), "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
                "-n", f"society-llm{index}-{os.getpid()}@%h"],
        "beat": [py, "-m", "celery", "-A", "config", "beat", "--loglevel", "WARNING", "--schedule", str(work / "beat")],
    }[name]


def _wait(check: Any, timeout: float, every: float = 0.25) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(Exception):
            if check():
                return True
        time.sleep(every)
    return False


def _redis_up(port: int) -> bool:
    import redis

    return bool(redis.Redis(host=HOST, port=port, socket_timeout=1).ping())


def _workers_up(count: int) -> bool:
    from config.celery import app

    return len(app.control.ping(timeout=1.0) or []) >= count


def _setup(args: argparse.Namespace, base_url: str) -> Any:
    from bots.models import BotProfile
    from experiment.models import Condition, Experiment, Session, Society

    s = args.phase_seconds
    profile = BotProfile.objects.create(name="society benchmark", base_url=base_url, api_key_env="", requires_key=False,
                                        model="fake-model", timeout_seconds=max(5.0, args.latency * 5), max_retries=2)
    experiment = Experiment.objects.create(
        name="Society benchmark", slug="society", n_selectors=3, n_bot_selectors=3, n_candidates=4, n_bot_candidates=4,
        n_rounds=args.rounds, belief_rounds="", pitch_seconds=s, choice_seconds=s, return_seconds=s, belief_seconds=s,
        feedback_seconds=1)
    Condition.objects.create(experiment=experiment, name="ai-only", society=Society.AI_ONLY, bot_profile=profile)
    return Session.objects.create(experiment=experiment, label="society benchmark", seed=args.seed,
                                  status=Session.Status.CLOSED, capacity=1)


def _start(session: Any, groups: int) -> tuple[list[int], float, float]:
    """Seat the groups in calls of at most MAX_SOCIETY_GROUPS; return their ids, when the first call began and
    when the last one committed (epoch seconds)."""
    from experiment import services

    began = time.time()
    ids: list[int] = []
    while len(ids) < groups:
        n = min(services.MAX_SOCIETY_GROUPS, groups - len(ids))
        ids += services.society_start(session_id=session.pk, groups=n)
    return ids, began, time.time()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 3)


def _spread(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": _pct(values, 50), "p95": _pct(values, 95), "p99": _pct(values, 99),
            "max": round(max(values), 3) if values else None}


def _epoch(value: datetime) -> float:
    return value.timestamp()


def _phase_result(args: argparse.Namespace, session: Any, ids: list[int], committed: float) -> dict[str, Any]:
    from experiment.models import Event, Message

    opened = {g: _epoch(t) for g, t in Event.objects.filter(session=session, type="phase.started", round_number=1,
                                                             phase="pitch").values_list("group_id", "created_at")}
    following = {g: _epoch(t) for g, t in Event.objects.filter(session=session, type="phase.started", round_number=1,
                                                                phase="choice").values_list("group_id", "created_at")}
    stored = [_epoch(t) for t in Message.objects.filter(group__session=session, round_number=1, timed_out=False)
              .values_list("created_at", flat=True)]
    from_commit = [following[g] - committed for g in ids if g in following]
    from_opening = [following[g] - opened[g] for g in ids if g in following and g in opened]
    due = len(ids) * 4
    target = 1.2 * args.latency
    out = {
        "decisions_due": due, "decisions_stored": len(stored),
        "timed_out": Message.objects.filter(group__session=session, round_number=1, timed_out=True).count(),
        "all_stored_after_commit_s": round(max(stored) - committed, 3) if stored else None,
        "next_phase_after_commit_s": _spread(from_commit),
        "next_phase_after_recorded_opening_s": _spread(from_opening),
        "target_s": target,
    }
    out["turn_steps_s"] = _turn_steps(session, committed)
    out["met"] = (len(stored) == due and out["timed_out"] == 0 and len(from_commit) == len(ids)
                  and max(from_commit) <= target)
    return out


def _turn_steps(session: Any, committed: float) -> dict[str, Any]:
    """Where a turn's time went, from the rows it wrote: the task reaching a worker (the call's row), the model,
    the decision stored after the reply, and its release through the services (the applied time)."""
    from bots.models import BotDecision, LLMCall

    calls = {d: (c, f) for d, c, f in LLMCall.objects.filter(session=session, applied=True)
             .values_list("decision_id", "created_at", "finished_at")}
    steps: dict[str, list[float]] = {"call_sent_after_commit": [], "model": [], "stored_after_reply": [],
                                     "applied_after_decided": []}
    for pk, decided, applied in BotDecision.objects.filter(session=session).values_list("pk", "decided_at", "applied_at"):
        if pk not in calls or decided is None or applied is None:
            continue
        sent, finished = calls[pk]
        steps["call_sent_after_commit"].append(_epoch(sent) - committed)
        steps["model"].append((finished - sent).total_seconds())
        steps["stored_after_reply"].append((decided - finished).total_seconds())
        steps["applied_after_decided"].append((applied - decided).total_seconds())
    return {name: _spread(values) for name, values in steps.items()}


def _scale_result(args: argparse.Namespace, session: Any, ids: list[int], began: float, finished_at: float) -> dict[str, Any]:
    from django.db.models import Count

    from bots.models import BotDecision, LLMCall
    from experiment.models import Choice, Event, Group, Message, Return

    groups = Group.objects.filter(session=session)
    decisions = (Message.objects.filter(group__session=session, timed_out=False).count()
                 + Choice.objects.filter(group__session=session, timed_out=False).count()
                 + Return.objects.filter(choice__group__session=session, timed_out=False).count())
    calls = dict(LLMCall.objects.filter(session=session).values_list("status").annotate(n=Count("id")))
    events = dict(Event.objects.filter(session=session, type__in=["default.applied", "automation.rejected"])
                  .values_list("type").annotate(n=Count("id")))
    turns = dict(BotDecision.objects.filter(session=session).values_list("status").annotate(n=Count("id")))
    finished = groups.filter(status=Group.Status.FINISHED).count()
    wall = max(1e-9, finished_at - began)
    errors = (calls.get("error", 0) + calls.get("invalid", 0) + calls.get("late", 0) + events.get("default.applied", 0)
              + events.get("automation.rejected", 0) + (len(ids) - finished))
    return {"groups_finished": finished, "decisions_stored": decisions, "llm_calls": calls, "bot_turns": turns,
            "defaults_applied": events.get("default.applied", 0), "refused": events.get("automation.rejected", 0),
            "errors": errors, "wall_s": round(wall, 1), "decisions_per_s": round(decisions / wall, 1),
            "met": errors == 0 and finished == len(ids)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if not _port_free(args.redis_port):
        raise SystemExit(f"Port {args.redis_port} on {HOST} is in use; choose another with --redis-port.")
    work = Path(tempfile.mkdtemp(prefix="partnerlab-society-"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PARTNERLAB_", "CELERY_"))},
           "DJANGO_SETTINGS_MODULE": "config.settings.production", "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
           "DJANGO_ALLOWED_HOSTS": HOST, "DJANGO_SECURE_SSL_REDIRECT": "0", "PARTNERLAB_LLM_QUEUE": "llm",
           "DATABASE_URL": f"{args.postgres.rstrip('/')}/{args.database}",
           "REDIS_URL": f"redis://{HOST}:{args.redis_port}/0", "DJANGO_STATIC_ROOT": str(work / "static"),
           "PARTNERLAB_VAR_DIR": str(work / "var"), "PYTHONUNBUFFERED": "1"}
    report: dict[str, Any] = {"command": " ".join(["bench/society.py", *(argv if argv is not None else sys.argv[1:])]),
                              "machine": machine(), "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    procs: list[Proc] = []
    fake = None
    code = 3
    try:
        procs.append(Proc("redis", _argv("redis", args, work), env=env, logs=work))
        if not _wait(lambda: _redis_up(args.redis_port), 15):
            raise SystemExit("redis-server did not start:\n" + procs[0].tail())
        _recreate_database(args.postgres, args.database)
        run_step([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], env=env, timeout=300)
        os.environ.update(env)
        import django

        django.setup()
        from bots.fake_openai import FakeOpenAI

        fake = FakeOpenAI(latency=args.latency).start()
        session = _setup(args, fake.base_url)
        procs.append(Proc("worker", _argv("worker", args, work), env=env, logs=work))
        for i in range(args.llm_workers):
            procs.append(Proc(f"llm-{i}", _argv("llm", args, work, i), env=env, logs=work))
        procs.append(Proc("beat", _argv("beat", args, work), env=env, logs=work))
        if not _wait(lambda: _workers_up(1 + args.llm_workers), 90):
            raise SystemExit("The Celery workers did not answer within 90 s:\n"
                             + "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs))
        code = 1
        # Per process kind; "load_generator" is this process: the fake model's server and the polling.
        meter = CpuMeter(groups={p.name: p.pgid for p in procs}, database=args.database)
        meter.start()
        ids, began, committed = _start(session, args.groups)
        report["seated_s"] = round(committed - began, 3)
        from experiment.models import Group, Message

        if args.scenario == "phase":
            due = args.groups * 4
            _wait(lambda: Group.objects.filter(session=session, round_number=1).exclude(phase="pitch").count() == len(ids)
                  and Message.objects.filter(group__session=session, round_number=1).count() >= due,
                  min(args.time_limit, args.phase_seconds + 30), every=0.05)
            report["result"] = _phase_result(args, session, ids, committed)
        else:
            _wait(lambda: not Group.objects.filter(session=session, status=Group.Status.PLAYING).exists(),
                  args.time_limit, every=0.5)
            report["result"] = _scale_result(args, session, ids, began, time.time())
        report["cpu"] = meter.stop()
        report["model_requests"] = len(fake.requests)
        report["log_problems"] = {p.name: sum(("Traceback" in line or " ERROR" in line or "CRITICAL" in line)
                                              for line in p.log_path.read_text(errors="replace").splitlines())
                                  for p in procs}
        code = 0 if report["result"]["met"] else 1
    finally:
        for p in reversed(procs):
            p.stop()
        close_run(report, started=started, work=work, keep_logs=args.keep_logs, code=code, postgres=args.postgres,
                  database=args.database, fake=fake)
    print(json.dumps(report, indent=2, default=str) if args.json else _text(report))
    return code


def _text(r: dict[str, Any]) -> str:
    lines = [f"{r['command']}", f"load average before {r['load_average_before']}, after {r.get('load_average_after')}"]
    if "seated_s" in r:
        lines.append(f"groups seated in {r['seated_s']} s")
    res = r.get("result", {})
    for key, value in res.items():
        lines.append(f"  {key}: {value}")
    if "cpu" in r:
        lines.append(f"  cpu (cores busy): {r['cpu']}")
    if "log_problems" in r:
        lines.append(f"  log problems: {r['log_problems']}")
    lines.append("TARGET MET" if res.get("met") else "TARGET MISSED")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
