"""Load benchmark: N concurrent synthetic participants against the production stack on this machine.

Starts, on 127.0.0.1 only, several uvicorn worker processes with ``config.settings.production``, a
Celery worker with embedded beat, a dedicated PostgreSQL database (created, migrated and dropped) and
a dedicated Redis database number (flushed before and after). Then N synthetic humans
(``bots.synthetic.SyntheticHuman`` driven by ``experiment.simulation``) join over HTTP and play over
websockets exactly as browsers do, arriving over ``--ramp-seconds``; bot seats are played by the
scripted backend through Celery. Everything it started is stopped, always, and the whole run is
bounded by ``--duration-limit``.

Reports p50/p95/p99 of the time from an action to its ack and from a phase's last decision to every
client of the group receiving the next phase, errors, stalled groups (not finished within the
design's deadline budget) and server CPU (CPU seconds of the server processes / wall seconds).

    .venv/bin/python bench/load.py                       # 1,000 participants: 142 groups of 5 humans + 2 bots
    .venv/bin/python bench/load.py --groups 200          # 1,000 synthetic humans (200 groups) + 400 bots
    .venv/bin/python bench/load.py --participants 70 --rounds 1 --json

A participant is a seat, human or bot, as DESIGN.md counts them; the synthetic humans connect over
websockets, the bots act through Celery.

Exit status: 0 all good; 1 errors or stalled groups; 2 latency target (p99 < 200 ms) missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
TARGET_P99_MS = 200.0


# ---- processes -------------------------------------------------------------------------------------

class Proc:
    """One started process group with its log file; stopping it stops its children too."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], logs: Path) -> None:
        self.name, self.log_path = name, logs / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pgid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 20) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


def run_step(argv: list[str], *, env: dict[str, str], timeout: float) -> None:
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[1:])} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


# ---- CPU accounting from /proc ---------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: str) -> tuple[int, float] | None:
    """(process group, CPU seconds) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[2]), (int(fields[11]) + int(fields[12])) / TICK


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy since boot (every process, ours or not)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK  # all but idle and iowait (guest is in user)


class CpuMeter:
    """Samples the CPU time of the server's processes, of this load generator and of the whole machine
    twice a second (processes may come and go), so that what other programs took is visible too."""

    def __init__(self, *, groups: dict[str, int], database: str) -> None:
        self.groups, self.database = groups, database  # name → process group id
        self.first: dict[str, float] = {}
        self.last: dict[str, tuple[str, float]] = {}  # pid → (kind, CPU seconds)
        self.series: list[tuple[float, float, float]] = []  # (epoch, machine busy s, our processes' CPU s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = self.ended = 0.0

    def _kind(self, pid: str, pgid: int) -> str | None:
        if int(pid) == os.getpid():
            return "load_generator"
        for name, group in self.groups.items():
            if pgid == group:
                return name
        line = _cmdline(pid)
        if line.startswith("postgres: ") and f" {self.database} " in line:
            return "postgres"
        if line.startswith("redis-server"):
            return "redis"
        return None

    def sample(self) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            stat = _proc_stat(pid)
            if stat is None:
                continue
            kind = self.last[pid][0] if pid in self.last else self._kind(pid, stat[0])
            if kind is None:
                continue
            if pid not in self.last:
                # A process that already ran before the measurement counts from now; a new one from zero.
                self.first[pid] = stat[1] if not self.started else 0.0
            self.last[pid] = (kind, stat[1])
        ours = sum(cpu - self.first.get(pid, 0.0) for pid, (_, cpu) in self.last.items())
        self.series.append((time.time(), _machine_busy(), ours))

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.sample()

    def start(self) -> None:
        self.sample()
        self.started = time.monotonic()
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()
        self.ended = time.monotonic()
        wall = max(1e-9, self.ended - self.started)
        per: dict[str, float] = {}
        for pid, (kind, cpu) in self.last.items():
            per[kind] = per.get(kind, 0.0) + max(0.0, cpu - self.first.get(pid, 0.0))
        out = {f"{kind}_cores": round(seconds / wall, 2) for kind, seconds in sorted(per.items())}
        out["app_cores"] = round(sum(per.get(k, 0.0) for k in ("uvicorn", "celery")) / wall, 2)
        out["server_cores"] = round(sum(v for k, v in per.items() if k != "load_generator") / wall, 2)
        machine = self.series[-1][1] - self.series[0][1]
        out["machine_cores"] = round(machine / wall, 2)
        out["other_programs_cores"] = round(max(0.0, machine - sum(per.values())) / wall, 2)
        out["wall_s"] = round(wall, 1)
        return out

    def buckets(self, seconds: float) -> list[dict[str, Any]]:
        """Per time slice: cores used by the machine, by other programs and by ours."""
        out = []
        start = self.series[0][0]
        edge, prev = start + seconds, self.series[0]
        for row in self.series[1:]:
            if row[0] >= edge or row is self.series[-1]:
                wall = max(1e-9, row[0] - prev[0])
                out.append({"t": round(prev[0] - start), "from": prev[0], "to": row[0],
                            "machine_cores": round((row[1] - prev[1]) / wall, 2),
                            "ours_cores": round((row[2] - prev[2]) / wall, 2),
                            "other_programs_cores": round(max(0.0, (row[1] - prev[1]) - (row[2] - prev[2])) / wall, 2)})
                prev, edge = row, row[0] + seconds
        return out


# ---- the machine ---------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = next((line.split(":", 1)[1].strip() for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "?")
    return {"nproc": os.cpu_count(), "cpu_model": model, "memory": mem, "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


# ---- the run ---------------------------------------------------------------------------------------------

def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=1000,
                        help="Participants (seats, human or bot, as DESIGN.md counts them), rounded down to whole groups: "
                             "1,000 is 142 groups of the default design (5 synthetic humans over websockets + 2 bots).")
    parser.add_argument("--groups", type=int, default=None,
                        help="Number of groups instead of --participants (e.g. 200: 1,000 synthetic humans + 400 bots).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phase-seconds", type=int, default=60,
                        help="Pitch, choice, return and belief phase length (DESIGN.md default 60); feedback is a quarter.")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="Multiplies the synthetic humans' response times (1: as people; 0.3: a stress test).")
    parser.add_argument("--ramp-seconds", type=float, default=120.0, help="Arrivals are spread over this long.")
    parser.add_argument("--duration-limit", type=float, default=1500.0,
                        help="Upper bound of the whole benchmark in seconds (setup, run and cleanup).")
    parser.add_argument("--workers", type=int, default=3,
                        help="uvicorn worker processes (on 2 cores 3 measured better than 2: docs/benchmarks.md).")
    parser.add_argument("--celery-concurrency", type=int, default=2)
    parser.add_argument("--port", type=int, default=8601)
    parser.add_argument("--database", default="partnerlab_load", help="PostgreSQL database created and dropped.")
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432",
                        help="PostgreSQL server (without a database name).")
    parser.add_argument("--redis-db", type=int, default=13, help="Redis database number (flushed before and after).")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    parser.add_argument("--keep-logs", action="store_true", help="Keep the processes' logs (printed path).")
    args = parser.parse_args(list(argv) if argv is not None else None)
    problems = [f"--{n.replace('_', '-')} must be at least {lo}" for n, lo in
                (("participants", 1), ("groups", 1), ("rounds", 1), ("phase_seconds", 2), ("workers", 1), ("celery_concurrency", 1))
                if getattr(args, n) is not None and getattr(args, n) < lo]
    if args.time_scale <= 0 or args.ramp_seconds < 0 or args.duration_limit < 60:
        problems.append("--time-scale must be > 0, --ramp-seconds >= 0 and --duration-limit >= 60")
    if not args.postgres.startswith(("postgres://postgres@127.0.0.1:", "postgresql://postgres@127.0.0.1:")):
        problems.append("--postgres must point at 127.0.0.1")
    if not args.database.replace("_", "").isalnum():
        problems.append("--database may contain letters, digits and _ only")
    if problems:
        parser.error("; ".join(problems))
    return args


def _on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    hard_end = started + args.duration_limit
    signal.signal(signal.SIGTERM, _on_signal)
    # Each participant holds a socket here and one in a server process.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * max(args.participants, 7 * (args.groups or 0)) + 1024)), hard))
    work = Path(tempfile.mkdtemp(prefix="partnerlab-load-"))
    database_url = f"{args.postgres.rstrip('/')}/{args.database}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PARTNERLAB_", "CELERY_"))},
           "DJANGO_SETTINGS_MODULE": "config.settings.production", "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
           "DJANGO_ALLOWED_HOSTS": HOST, "DJANGO_SECURE_SSL_REDIRECT": "0", "DATABASE_URL": database_url,
           "REDIS_URL": f"redis://{HOST}:6379/{args.redis_db}", "DJANGO_STATIC_ROOT": str(work / "static"),
           "PARTNERLAB_VAR_DIR": str(work / "var"), "PYTHONUNBUFFERED": "1"}
    procs: list[Proc] = []
    report: dict[str, Any] = {"machine": machine(), "command": " ".join(["bench/load.py", *(argv or sys.argv[1:])])}
    code = 1
    say = (lambda *_: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        if not _port_free(args.port):
            # Otherwise the clients would silently measure whatever already answers there.
            raise SystemExit(f"Port {args.port} on {HOST} is in use; choose another with --port.")
        say(f"Preparing database {args.database} and Redis db {args.redis_db} …")
        _recreate_database(args.postgres, args.database)
        _flush_redis(env["REDIS_URL"])
        py = sys.executable
        run_step([py, "manage.py", "migrate", "--noinput", "-v0"], env=env, timeout=180)
        run_step([py, "manage.py", "collectstatic", "--noinput", "-v0"], env=env, timeout=180)
        os.environ.update(env)
        import django

        django.setup()
        session, experiment = _setup(args)
        seats = experiment.n_selectors + experiment.n_candidates
        groups = args.groups or args.participants // seats
        clients = groups * experiment.n_humans
        if clients == 0:
            raise SystemExit(f"--participants must be at least {seats} (one group's seats).")
        session.capacity = clients
        session.save(update_fields=["capacity"])
        say(f"Starting {args.workers} uvicorn workers on {HOST}:{args.port} and a Celery worker with beat …")
        procs.append(Proc("uvicorn", [py, "-m", "uvicorn", "config.asgi:application", "--host", HOST, "--port",
                                      str(args.port), "--workers", str(args.workers), "--lifespan", "on",
                                      "--log-level", "warning", "--no-access-log"], env=env, logs=work))
        procs.append(Proc("celery", [py, "-m", "celery", "-A", "config", "worker", "-B", "--concurrency",
                                     str(args.celery_concurrency), "--loglevel", "WARNING", "--without-gossip",
                                     "--without-mingle", "--schedule", str(work / "beat-schedule"),
                                     "-n", f"load-{os.getpid()}@%h"], env=env, logs=work))
        _wait_ready(procs, args.port, deadline=time.monotonic() + 90)
        meter = CpuMeter(groups={p.name: p.pgid for p in procs}, database=args.database)
        report["config"] = {"participants": groups * seats, "synthetic_humans": clients, "groups": groups,
                            "humans_per_group": experiment.n_humans,
                            "bot_seats": groups * (seats - experiment.n_humans),
                            "rounds": args.rounds, "phase_seconds": args.phase_seconds,
                            "time_scale": args.time_scale, "ramp_seconds": args.ramp_seconds,
                            "uvicorn_workers": args.workers, "celery_concurrency": args.celery_concurrency}
        say(f"Running {groups * seats} participants ({clients} synthetic humans) in {groups} groups …")
        meter.start()
        time_limit = max(10.0, hard_end - time.monotonic() - 60)  # leave a minute for measuring and cleaning up
        reports, duration = _drive(args, session.code, clients, experiment, time_limit)
        report["cpu"] = meter.stop()
        report["timeline"] = _timeline(meter, reports, seconds=30)
        report.update(_results(session, experiment, reports, duration))
        report["server_log_problems"] = _log_problems(procs)
        report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        worst = max(report["ack_ms"]["p99"] or 0, report["phase_change_ms"]["p99"] or 0)
        report["target_met"] = (report["errors"] == 0 and not report["groups_stalled"] and worst < TARGET_P99_MS
                                and report["groups_completed"] == report["config"]["groups"])
        code = 0 if report["target_met"] else (1 if report["errors"] or report["groups_stalled"]
                                                or report["groups_completed"] < report["config"]["groups"] else 2)
    except KeyboardInterrupt as exc:
        report["aborted"] = str(exc) or "interrupted"
    finally:
        for proc in reversed(procs):
            proc.stop()
        with contextlib.suppress(Exception):
            from django.db import connections

            connections.close_all()
        with contextlib.suppress(Exception):
            _drop_database(args.postgres, args.database)
        with contextlib.suppress(Exception):
            _flush_redis(env["REDIS_URL"])
        report["total_s"] = round(time.monotonic() - started, 1)
        if args.keep_logs or code == 1:
            report["logs"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2, default=str) if args.json else _text(report))
    return code


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no conflict
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _recreate_database(server: str, name: str) -> None:
    import psycopg

    with psycopg.connect(f"{server.rstrip('/')}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def _drop_database(server: str, name: str) -> None:
    import psycopg

    with psycopg.connect(f"{server.rstrip('/')}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def _setup(args: argparse.Namespace) -> tuple[Any, Any]:
    from experiment.models import Condition, Experiment, Session

    s = args.phase_seconds
    experiment = Experiment.objects.create(
        name="Load benchmark", slug="load", n_rounds=args.rounds, pitch_seconds=s, choice_seconds=s, return_seconds=s,
        belief_seconds=s, feedback_seconds=max(1, s // 4), belief_rounds="last",
        # Whoever is left in the lobby (a group-mate failed) is sent away soon instead of holding the run open.
        lobby_timeout_seconds=int(args.ramp_seconds) + 120)
    Condition.objects.create(experiment=experiment, name="hidden", disclose_identity=False)
    Condition.objects.create(experiment=experiment, name="disclosed", disclose_identity=True)
    session = Session.objects.create(experiment=experiment, label="load benchmark", seed=args.seed,
                                     capacity=args.participants)
    return session, experiment


def _wait_ready(procs: list[Proc], port: int, *, deadline: float) -> None:
    import http.client

    from config.celery import app

    web_ok = worker_ok = False
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.running():
                raise SystemExit(f"{proc.name} exited while starting:\n{proc.tail()}")
        if not web_ok:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn.request("GET", "/healthz")
                web_ok = conn.getresponse().status == 200
            conn.close()
        if not worker_ok:
            with contextlib.suppress(Exception):
                worker_ok = bool(app.control.ping(timeout=1.0))
        if web_ok and worker_ok:
            return
        time.sleep(0.5)
    raise SystemExit("The server or the Celery worker did not become ready within 90 s:\n"
                     + "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs))


def _drive(args: argparse.Namespace, code: str, clients: int, experiment: Any, time_limit: float) -> tuple[list[Any], float]:
    import dataclasses

    from bots.synthetic import SyntheticHuman, SyntheticParams
    from experiment.simulation import run_clients

    params = SyntheticParams()
    human = SyntheticHuman(dataclasses.replace(params, speed=params.speed * args.time_scale),
                           quiz_key={str(i): q["answer"] for i, q in enumerate(experiment.quiz)})
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    began = time.monotonic()
    reports = asyncio.run(run_clients(base_url=f"http://{HOST}:{args.port}", code=code, count=clients, human=human,
                                      seed=args.seed, group_size=experiment.n_humans, ordered=False,
                                      ramp_seconds=args.ramp_seconds, time_limit=time_limit))
    return reports, time.monotonic() - began


def _results(session: Any, experiment: Any, reports: list[Any], duration: float) -> dict[str, Any]:
    from experiment.models import Group, Participant
    from experiment.simulation import game_budget_seconds, stored_counts, summarize

    group_of = dict(Participant.objects.filter(session=session, controller=Participant.Controller.PERSON)
                    .values_list("token", "group_id"))
    summary = summarize(reports, group_of=group_of, duration=duration)
    budget = game_budget_seconds(experiment.params())
    stalled = []
    for g in Group.objects.filter(session=session):
        took = (g.finished_at - g.created_at).total_seconds() if g.finished_at else None
        if g.status != Group.Status.FINISHED or took is None or took > budget:
            stalled.append({"group": g.number, "status": g.status, "round": g.round_number, "phase": g.phase,
                            "seconds": took})
    summary.update(stored_counts(session_id=session.pk))
    summary["groups_stalled"] = stalled
    summary["group_budget_s"] = budget
    summary["unplaced"] = Participant.objects.filter(session=session, group__isnull=True).count()
    return summary


def _timeline(meter: CpuMeter, reports: list[Any], *, seconds: float) -> list[dict[str, Any]]:
    """CPU per time slice next to the actions sent in it and their ack p99: shows whether slow
    acknowledgements coincide with the server's own load or with other programs'."""
    from experiment.simulation import percentiles

    actions = [a for r in reports for a in r.actions if a.latency is not None]
    rows = []
    for b in meter.buckets(seconds):
        inside = [a.latency for a in actions if b["from"] <= a.sent_at < b["to"]]
        p = percentiles(inside)
        rows.append({k: v for k, v in b.items() if k not in ("from", "to")} | {"actions": len(inside), "ack_p99_ms": p["p99"]})
    return rows


def _log_problems(procs: list[Proc]) -> dict[str, int]:
    counts = {}
    for proc in procs:
        text = proc.log_path.read_text(errors="replace")
        counts[proc.name] = text.count("Traceback") + text.count(" ERROR")
    return counts


def _text(r: dict[str, Any]) -> str:
    def ms(p: dict[str, Any] | None) -> str:
        if not p or not p.get("n"):
            return "no samples"
        return f"p50 {p['p50']} ms   p95 {p['p95']} ms   p99 {p['p99']} ms   max {p['max']} ms   (n={p['n']})"

    m = r["machine"]
    lines = [f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory']} RAM, load average before "
             f"{m['load_average']}" + (f", after {m['load_average_after']}" if "load_average_after" in m else "")]
    if "aborted" in r:
        lines.append(f"ABORTED: {r['aborted']}")
    if "config" in r:
        c = r["config"]
        lines.append(f"Run: {c['participants']} participants in {c['groups']} groups ({c.get('synthetic_humans')} synthetic humans, "
                     f"{c['humans_per_group']} humans "
                     f"+ bots; {c['bot_seats']} scripted bot seats), {c['rounds']} rounds, phases {c['phase_seconds']} s, "
                     f"time scale {c['time_scale']}, ramp {c['ramp_seconds']} s, {c['uvicorn_workers']} uvicorn workers, "
                     f"Celery concurrency {c['celery_concurrency']}")
    if "ack_ms" in r:
        cpu = r["cpu"]
        lines += [
            f"Groups completed: {r['groups_completed']} of {r['config']['groups']}; stalled: {len(r['groups_stalled'])}; "
            f"unplaced participants: {r['unplaced']}",
            f"Decisions: {r['decisions']} (actions acked: {r['actions']}); errors: {r['errors']} {r['errors_by_kind'] or ''}",
            f"Action → ack:             {ms(r['ack_ms'])}",
            f"Last decision → group:    {ms(r['phase_change_ms'])}",
            f"  of which until the view: {ms(r['phase_change_to_view_ms'])}",
            f"  view built → client:     {ms(r['phase_change_view_to_client_ms'])}",
            f"Deadline → group:         {ms(r['phase_change_after_deadline_ms'])}",
            "CPU (cores busy): " + ", ".join(f"{k.removesuffix('_cores')} {v}" for k, v in cpu.items() if k.endswith("_cores")),
            "Timeline (s: actions, ack p99 ms | cores: ours, other programs): " + "  ".join(
                f"{t['t']}: {t['actions']}, {t['ack_p99_ms']} | {t['ours_cores']}, {t['other_programs_cores']}"
                for t in r["timeline"]),
            f"Run {r['duration_s']} s; total {r['total_s']} s; server log problems: {r['server_log_problems']}",
            "TARGET MET (p99 < 200 ms, no errors, no stalled groups)" if r["target_met"] else "TARGET MISSED",
        ]
        lines += [f"  error: {e['code']}: {e['message']}" for e in r["error_examples"]]
        lines += [f"  stalled: {s}" for s in r["groups_stalled"][:10]]
    if "logs" in r:
        lines.append(f"Logs: {r['logs']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
