"""Load benchmark: N concurrent synthetic participants against the production stack on this machine.

Starts, on 127.0.0.1 only, several uvicorn worker processes with ``config.settings.production``, a
Celery worker with embedded beat, a dedicated PostgreSQL database (created, migrated and dropped) and
a dedicated Redis database number (flushed before and after). Then N synthetic humans
(``bots.synthetic.SyntheticHuman`` driven by ``experiment.simulation``) join over HTTP and play over
websockets exactly as browsers do, arriving over ``--ramp-seconds``; bot seats are played by the
scripted backend through Celery. Like the pages, a client asks again after a "study is busy" answer (HTTP
503 with Retry-After: after that long, at most ``--busy-max-wait`` s, ``--busy-tries`` answers per page)
and reopens a lost websocket with the game page's backoff. Everything it started is stopped, always, and
the whole run is bounded by ``--duration-limit``.

Reports p50/p95/p99 of the time from an action to its ack and from a phase's last decision to every
client of the group receiving the next phase; every HTTP answer of the join link and the game page by
status; busy answers (503 with Retry-After, websocket close 4503) and whether the people who got them were
then placed in a group or lost; people who never got a seat or gave up; participants never placed in a
group; errors; stalled groups (not finished within the design's deadline budget); server CPU (CPU seconds
of the server processes / wall seconds); the peak number of PostgreSQL connections to the benchmark's
database (``pg_stat_activity``, sampled twice a second) and of Redis clients; the server's event loop as
seen from outside (time to answer ``GET /healthz`` once a second) and the load generator's own loop lag.
For each resource it says when, if at all, it reached its limit, and which did first (``first_limit``):
CPU (the machine's cores 90 % busy over 5 s), database connections (a busy answer, or PostgreSQL near
``max_connections``), Redis (its process 90 % of a core over 5 s, or near ``maxclients``), the server's
event loop (``/healthz`` took 200 ms or more twice in a row) and the load generator (its loop 100 ms late).

    .venv/bin/python bench/load.py                       # 1,000 participants: 142 groups of 5 humans + 2 bots
    .venv/bin/python bench/load.py --groups 200          # 1,000 synthetic humans (200 groups) + 400 bots
    .venv/bin/python bench/load.py --scenario launch     # a recruitment launch: 100 groups arriving within 30 s
    .venv/bin/python bench/load.py --scenario launch-people   # 1,000 participants arriving within 60 s
    .venv/bin/python bench/load.py --scenario launch --groups 150   # a scenario, one setting changed
    .venv/bin/python bench/load.py --participants 70 --rounds 1 --json

A scenario sets several options at once (``--help`` lists them); options given explicitly win, and an
explicit ``--participants`` or ``--groups`` replaces the scenario's size. ``bench/knee.py`` runs a scenario
at growing sizes and reports the largest that meets the target.

A participant is a seat, human or bot, as DESIGN.md counts them; the synthetic humans connect over
websockets, the bots act through Celery.

Target: 0 errors (every 5xx answer except a busy 503 with Retry-After is one, and so is a lost websocket),
0 participants never placed in a group, every group completed, none stalled, ack p99 and phase change p99
under 200 ms. A busy answer is not an error when the person then got a seat in a group.

Exit status: 0 target met; 1 errors, unplaced participants, or groups stalled or not completed; 2 only the
latency target (p99 < 200 ms) missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
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

# Named runs: a scenario's settings are the defaults of its run; options given explicitly win.
SCENARIOS: dict[str, dict[str, Any]] = {
    # Issue "Launch day": a recruitment launch, people as fast as a stress test, all within 30 s.
    "launch": {"groups": 100, "time_scale": 0.1, "ramp_seconds": 30.0, "phase_seconds": 20},
    # 1,000 participants (142 groups) at human speed, all arriving within a minute.
    "launch-people": {"participants": 1000, "ramp_seconds": 60.0},
}
DEFAULT_PARTICIPANTS = 1000

# When a resource counts as run out (see _limits): shares of its capacity, and slice lengths.
CPU_FULL = 0.9  # of the machine's cores, over a slice
REDIS_FULL = 0.9  # of one core: redis-server executes commands on one thread
CONNECTIONS_FULL = 0.95  # of PostgreSQL's max_connections / Redis's maxclients
SLICE_SECONDS = 5.0
HEALTH_SLOW_S = TARGET_P99_MS / 1000  # a /healthz this slow means the web processes' loops are behind
LOADGEN_LAG_S = 0.1  # the load generator's own loop this late: its measurements are no longer the server's


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
        # (epoch, machine busy s, our processes' CPU s, redis-server's CPU s)
        self.series: list[tuple[float, float, float, float]] = []
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
        redis = sum(cpu - self.first.get(pid, 0.0) for pid, (kind, cpu) in self.last.items() if kind == "redis")
        self.series.append((time.time(), _machine_busy(), ours, redis))

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
        """Per time slice: cores used by the machine, by other programs, by ours and by redis-server."""
        out = []
        start = self.series[0][0]
        edge, prev = start + seconds, self.series[0]
        for row in self.series[1:]:
            if row[0] >= edge or row is self.series[-1]:
                wall = max(1e-9, row[0] - prev[0])
                out.append({"t": round(prev[0] - start), "from": prev[0], "to": row[0],
                            "machine_cores": round((row[1] - prev[1]) / wall, 2),
                            "ours_cores": round((row[2] - prev[2]) / wall, 2),
                            "other_programs_cores": round(max(0.0, (row[1] - prev[1]) - (row[2] - prev[2])) / wall, 2),
                            "redis_cores": round((row[3] - prev[3]) / wall, 2)})
                prev, edge = row, row[0] + seconds
        return out


class ResourceSampler:
    """Twice a second, in a thread of its own: PostgreSQL's client connections (to the benchmark's database,
    by state, and to the whole server) from ``pg_stat_activity``, and Redis's clients (of the benchmark's
    database number and of the whole server). Its own PostgreSQL connection is to the ``postgres`` database,
    so it is not among the benchmark database's; it is among the server's."""

    def __init__(self, *, postgres: str, database: str, redis_url: str, redis_db: int, every: float = 0.5) -> None:
        self.postgres, self.database, self.redis_url, self.redis_db, self.every = postgres, database, redis_url, redis_db, every
        self.series: list[dict[str, float]] = []
        self.settings: dict[str, Any] = {}
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg
        import redis

        db: psycopg.Connection | None = None
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        try:
            while True:
                row: dict[str, float] = {"t": time.time()}
                try:
                    if db is None or db.closed:
                        db = psycopg.connect(f"{self.postgres.rstrip('/')}/postgres", autocommit=True, connect_timeout=5)
                        if "max_connections" not in self.settings:
                            for name in ("max_connections", "superuser_reserved_connections"):
                                self.settings[name] = int(db.execute(f"SHOW {name}").fetchone()[0])
                    ours, active, idle_tx, server = db.execute(
                        "SELECT count(*) FILTER (WHERE datname = %s),"
                        " count(*) FILTER (WHERE datname = %s AND state = 'active'),"
                        " count(*) FILTER (WHERE datname = %s AND state LIKE 'idle in transaction%%'),"
                        " count(*) FILTER (WHERE backend_type = 'client backend')"
                        " FROM pg_stat_activity", (self.database,) * 3).fetchone()
                    row |= {"db": ours, "db_active": active, "db_idle_in_transaction": idle_tx, "db_server": server}
                except Exception:
                    self.failures += 1
                    with contextlib.suppress(Exception):
                        if db is not None:
                            db.close()
                    db = None
                try:
                    info = client.info("clients")
                    self.settings.setdefault("maxclients", int(info.get("maxclients") or 0) or None)
                    row["redis_server"] = int(info["connected_clients"])
                    row["redis_db"] = sum(c.get("db") == str(self.redis_db) for c in client.client_list())
                except Exception:
                    self.failures += 1
                self.series.append(row)
                if self._stop.wait(self.every):
                    return
        finally:
            with contextlib.suppress(Exception):
                if db is not None:
                    db.close()
            client.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def peak(self, key: str) -> int | None:
        values = [row[key] for row in self.series if key in row]
        return int(max(values)) if values else None

    def mean(self, key: str) -> float | None:
        values = [row[key] for row in self.series if key in row]
        return round(sum(values) / len(values), 1) if values else None


# ---- the machine ---------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = next((line.split(":", 1)[1].strip() for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "?")
    return {"nproc": os.cpu_count(), "cpu_model": model, "memory": mem, "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


# ---- the run ---------------------------------------------------------------------------------------------

def _scenario_help() -> str:
    return "; ".join(f"{name}: " + " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in settings.items())
                     for name, settings in SCENARIOS.items())


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    argv = list(argv) if argv is not None else sys.argv[1:]
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Target: 0 errors (5xx answers other than a busy 503 with Retry-After count), 0 unplaced participants, "
               "every group completed and none stalled, ack p99 and phase change p99 < 200 ms. Exit status: 0 target met; "
               "1 errors, unplaced participants, stalled or uncompleted groups; 2 only the latency target missed.")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS),
                        help="A named run whose settings become the defaults (options given explicitly win; an explicit "
                             f"--participants or --groups replaces its size): {_scenario_help()}.")
    parser.add_argument("--participants", type=int, default=None,
                        help="Participants (seats, human or bot, as DESIGN.md counts them), rounded down to whole groups: "
                             "1,000 (the default) is 142 groups of the default design (5 synthetic humans over websockets "
                             "+ 2 bots).")
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
    parser.add_argument("--busy-tries", type=int, default=12,
                        help="A client asks a page again after a busy answer (503 with Retry-After) up to this many answers "
                             "in all, then gives up (counted as lost).")
    parser.add_argument("--busy-max-wait", type=float, default=30.0,
                        help="Longest a client waits for one Retry-After, seconds.")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    parser.add_argument("--keep-logs", action="store_true", help="Keep the processes' logs (printed path).")
    known, _ = parser.parse_known_args(argv)
    scenario = SCENARIOS.get(known.scenario or "", {})
    parser.set_defaults(**{k: v for k, v in scenario.items() if k not in ("participants", "groups")})
    args = parser.parse_args(argv)
    if args.participants is None and args.groups is None:  # the size: given explicitly, else the scenario's
        args.participants, args.groups = scenario.get("participants"), scenario.get("groups")
    if args.participants is None:
        args.participants = DEFAULT_PARTICIPANTS
    problems = [f"--{n.replace('_', '-')} must be at least {lo}" for n, lo in
                (("participants", 1), ("groups", 1), ("rounds", 1), ("phase_seconds", 2), ("workers", 1), ("celery_concurrency", 1),
                 ("busy_tries", 1))
                if getattr(args, n) is not None and getattr(args, n) < lo]
    if args.time_scale <= 0 or args.ramp_seconds < 0 or args.duration_limit < 60 or args.busy_max_wait < 0:
        problems.append("--time-scale must be > 0, --ramp-seconds >= 0, --busy-max-wait >= 0 and --duration-limit >= 60")
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
    if not _port_free(args.port):
        # Otherwise the clients would silently measure whatever already answers there. Checked before the
        # cleanup below is armed: it drops the database and flushes Redis, and a run already using this port
        # (another load.py) would lose both mid-run.
        raise SystemExit(f"Port {args.port} on {HOST} is in use; choose another with --port.")
    try:
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
        sampler = ResourceSampler(postgres=args.postgres, database=args.database, redis_url=env["REDIS_URL"],
                                  redis_db=args.redis_db)
        report["config"] = {"scenario": args.scenario, "participants": groups * seats, "synthetic_humans": clients,
                            "groups": groups, "humans_per_group": experiment.n_humans,
                            "bot_seats": groups * (seats - experiment.n_humans),
                            "rounds": args.rounds, "phase_seconds": args.phase_seconds,
                            "time_scale": args.time_scale, "ramp_seconds": args.ramp_seconds,
                            "uvicorn_workers": args.workers, "celery_concurrency": args.celery_concurrency,
                            "redis_db": args.redis_db, "busy_tries": args.busy_tries, "busy_max_wait_s": args.busy_max_wait,
                            "db_pool": _db_pool()}
        say(f"Running {groups * seats} participants ({clients} synthetic humans) in {groups} groups …")
        meter.start()
        sampler.start()
        time_limit = max(10.0, hard_end - time.monotonic() - 60)  # leave a minute for measuring and cleaning up
        try:
            reports, probes, duration = _drive(args, session.code, clients, experiment, time_limit)
        finally:
            sampler.stop()
        report["cpu"] = meter.stop()
        report["timeline"] = _timeline(meter, sampler, reports, seconds=30)
        report.update(_results(session, experiment, reports, duration))
        report["server_log_problems"] = _log_problems(procs)
        report["resources"] = _resources(sampler, probes, procs)
        report["limits"] = _limits(meter, sampler, probes, reports, procs)
        report["first_limit"] = _first_limit(report["limits"])
        report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        report["target_missed"] = _missed(report)
        report["target_met"] = not report["target_missed"]
        code = 0 if report["target_met"] else (2 if all(m.startswith(("ack", "phase")) for m in report["target_missed"]) else 1)
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


def close_run(report: dict[str, Any], *, started: float, work: Path, keep_logs: bool, code: int, postgres: str,
              database: str, fake: Any = None) -> None:
    """The end of a benchmark that ran its own stack (after its processes stopped): stop the fake model, drop the
    database, note the load average and the time, keep the logs when asked or when the run failed."""
    if fake is not None:
        fake.stop()
    with contextlib.suppress(Exception):
        from django.db import connections

        connections.close_all()
    with contextlib.suppress(Exception):
        _drop_database(postgres, database)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["total_s"] = round(time.monotonic() - started, 1)
    if keep_logs or code != 0:
        report["logs"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)


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


def _db_pool() -> dict[str, Any] | None:
    """The connection pool of the server's settings (the same settings module as the server's processes)."""
    from django.conf import settings

    pool = settings.DATABASES["default"].get("OPTIONS", {}).get("pool")
    if not pool:
        return None
    return {k: v for k, v in pool.items() if k in ("min_size", "max_size", "timeout")} if isinstance(pool, dict) else {"default": True}


async def _probe(base_url: str, stop: asyncio.Event, out: dict[str, list[tuple[float, float | None]]]) -> None:
    """While the clients run, in their event loop: once a second the time the server takes to answer
    ``GET /healthz`` (no database: the web processes' event loop and thread hop, as seen from outside; None
    when it did not answer 200), and ten times a second how late this loop wakes from a 0.1 s sleep."""
    from experiment.simulation import http_get

    loop = asyncio.get_running_loop()

    async def lag() -> None:
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.1)
            out["loop_lag"].append((time.time(), max(0.0, loop.time() - before - 0.1)))

    async def health() -> None:
        while not stop.is_set():
            sent, started = time.time(), time.perf_counter()
            try:
                status, _, _ = await http_get(f"{base_url}/healthz")
            except Exception:  # refused, reset, timed out: no answer
                status = 0
            out["healthz"].append((sent, time.perf_counter() - started if status == 200 else None))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    await asyncio.gather(lag(), health())


def _drive(args: argparse.Namespace, code: str, clients: int, experiment: Any,
           time_limit: float) -> tuple[list[Any], dict[str, list[tuple[float, float | None]]], float]:
    import dataclasses

    from bots.synthetic import SyntheticHuman, SyntheticParams
    from experiment.simulation import run_clients

    params = SyntheticParams()
    human = SyntheticHuman(dataclasses.replace(params, speed=params.speed * args.time_scale),
                           quiz_key={str(i): q["answer"] for i, q in enumerate(experiment.quiz)})
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    base_url = f"http://{HOST}:{args.port}"
    probes: dict[str, list[tuple[float, float | None]]] = {"healthz": [], "loop_lag": []}

    async def run() -> list[Any]:
        stop = asyncio.Event()
        probing = asyncio.create_task(_probe(base_url, stop, probes))
        try:
            return await run_clients(base_url=base_url, code=code, count=clients, human=human, seed=args.seed,
                                     group_size=experiment.n_humans, ordered=False, ramp_seconds=args.ramp_seconds,
                                     time_limit=time_limit, busy_tries=args.busy_tries, busy_max_wait=args.busy_max_wait)
        finally:
            stop.set()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(probing, 3)

    began = time.monotonic()
    reports = asyncio.run(run())
    return reports, probes, time.monotonic() - began


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


def _timeline(meter: CpuMeter, sampler: ResourceSampler, reports: list[Any], *, seconds: float) -> list[dict[str, Any]]:
    """CPU per time slice next to the actions sent in it and their ack p99, the busy answers given in it and
    the most database connections seen in it: shows whether slow acknowledgements coincide with the server's
    own load or with other programs', and when the arrivals ran the database's connections short."""
    from experiment.simulation import percentiles

    actions = [a for r in reports for a in r.actions if a.latency is not None]
    busy = _busy_times(reports)
    rows = []
    for b in meter.buckets(seconds):
        inside = [a.latency for a in actions if b["from"] <= a.sent_at < b["to"]]
        p = percentiles(inside)
        db = [row["db"] for row in sampler.series if "db" in row and b["from"] <= row["t"] < b["to"]]
        rows.append({k: v for k, v in b.items() if k not in ("from", "to")}
                    | {"actions": len(inside), "ack_p99_ms": p["p99"], "busy": sum(b["from"] <= t < b["to"] for t in busy),
                       "db_connections_max": max(db, default=None)})
    return rows


def _busy_times(reports: list[Any]) -> list[float]:
    """When each busy answer (HTTP 503 with Retry-After, websocket busy close) was asked for, epoch seconds."""
    return sorted([h.at for r in reports for h in r.http if h.busy] + [w.at for r in reports for w in r.ws if w.busy])


def _log_count(procs: list[Proc], *needles: str) -> int:
    total = 0
    for proc in procs:
        text = proc.log_path.read_text(errors="replace")
        total += sum(text.count(n) for n in needles)
    return total


def _resources(sampler: ResourceSampler, probes: dict[str, list[tuple[float, float | None]]],
               procs: list[Proc]) -> dict[str, Any]:
    """Peaks of what the fix is about (database connections) and of the other resources a burst can exhaust."""
    from experiment.simulation import percentiles

    health = [seconds for _, seconds in probes["healthz"]]
    return {
        "db_connections": {
            "database": sampler.database, "peak": sampler.peak("db"), "mean": sampler.mean("db"),
            "peak_active": sampler.peak("db_active"), "peak_idle_in_transaction": sampler.peak("db_idle_in_transaction"),
            "server_peak": sampler.peak("db_server"),  # every database of the PostgreSQL server, this sampler included
            "max_connections": sampler.settings.get("max_connections"),
            "superuser_reserved_connections": sampler.settings.get("superuser_reserved_connections"),
            "samples": sum("db" in row for row in sampler.series), "sampler_failures": sampler.failures,
            "refused_in_server_logs": _log_count(procs, "too many clients"),
            "pool_timeouts_in_server_logs": _log_count(procs, "PoolTimeout"),
        },
        "redis_clients": {"db_peak": sampler.peak("redis_db"), "server_peak": sampler.peak("redis_server"),
                          "maxclients": sampler.settings.get("maxclients")},
        "healthz_ms": percentiles([x for x in health if x is not None]),
        "healthz_failed": sum(x is None for x in health),
        "load_generator_lag_ms": percentiles([x for _, x in probes["loop_lag"] if x is not None]),
    }


def _limits(meter: CpuMeter, sampler: ResourceSampler, probes: dict[str, list[tuple[float, float | None]]],
            reports: list[Any], procs: list[Proc]) -> dict[str, dict[str, Any]]:
    """For every resource: whether it ran out, and when first (seconds since the clients began arriving)."""
    origin = meter.series[0][0]

    def since(epoch: float | None) -> float | None:
        return None if epoch is None else round(max(0.0, epoch - origin), 1)

    def first(epochs: Iterable[float | None]) -> float | None:
        return min((e for e in epochs if e is not None), default=None)

    cores = os.cpu_count() or 1
    slices = meter.buckets(SLICE_SECONDS)
    cpu_full = next((b for b in slices if b["machine_cores"] >= CPU_FULL * cores), None)
    redis_hot = next((b for b in slices if b["redis_cores"] >= REDIS_FULL), None)

    max_conn = sampler.settings.get("max_connections")
    db_near_max = first(row["t"] for row in sampler.series
                        if max_conn and row.get("db_server", 0) >= CONNECTIONS_FULL * max_conn)
    busy = _busy_times(reports)
    fives = sorted(h.at for r in reports for h in r.http if h.status >= 500 and not h.busy)
    refused = _log_count(procs, "too many clients", "PoolTimeout")
    # A 5xx is put down to the database when the server's logs say it refused or the pool timed out.
    db_epoch = first([db_near_max, busy[0] if busy else None, fives[0] if fives and refused else None])
    why = [w for w, e in (("busy answers (no connection for a request)", busy[0] if busy else None),
                          ("PostgreSQL near max_connections", db_near_max),
                          ("HTTP 5xx with 'too many clients' / PoolTimeout in the server logs", fives[0] if fives and refused else None))
           if e is not None]

    maxclients = sampler.settings.get("maxclients")
    redis_full = first(row["t"] for row in sampler.series if maxclients and row.get("redis_server", 0) >= CONNECTIONS_FULL * maxclients)
    # Two slow answers in a row, so that one lost packet (a 200 ms retransmission) is not taken for a busy loop.
    health_slow = [(t, seconds is None or seconds >= HEALTH_SLOW_S) for t, seconds in probes["healthz"]]
    slow_health = first(t for (t, slow), (_, next_slow) in itertools.pairwise(health_slow) if slow and next_slow)
    late_loop = first(t for t, lag in probes["loop_lag"] if lag is not None and lag >= LOADGEN_LAG_S)
    health = [seconds for _, seconds in probes["healthz"] if seconds is not None]
    lags = [lag for _, lag in probes["loop_lag"] if lag is not None]
    return {
        "cpu": {"first_at_s": since(cpu_full["from"]) if cpu_full else None, "cores": cores,
                "rule": f"machine cores busy >= {CPU_FULL:.0%} of {cores} over {SLICE_SECONDS:.0f} s",
                "peak_machine_cores": max((b["machine_cores"] for b in slices), default=None),
                "peak_ours_cores": max((b["ours_cores"] for b in slices), default=None),
                "then": {k: cpu_full[k] for k in ("machine_cores", "ours_cores", "other_programs_cores")} if cpu_full else None},
        "db_connections": {"first_at_s": since(db_epoch), "why": why, "first_busy_at_s": since(busy[0] if busy else None),
                           "first_near_max_connections_at_s": since(db_near_max), "peak": sampler.peak("db"),
                           "server_peak": sampler.peak("db_server"), "max_connections": max_conn},
        "redis": {"first_at_s": since(first([redis_hot["from"] if redis_hot else None, redis_full])),
                  "rule": f"redis-server >= {REDIS_FULL:.0%} of a core over {SLICE_SECONDS:.0f} s, or clients near maxclients",
                  "peak_cores": max((b["redis_cores"] for b in slices), default=None), "peak_clients": sampler.peak("redis_server")},
        "event_loop": {"first_at_s": since(slow_health),
                       "rule": f"GET /healthz unanswered or >= {HEALTH_SLOW_S * 1000:.0f} ms twice in a row",
                       "slowest_healthz_ms": round(max(health) * 1000, 1) if health else None},
        "load_generator": {"first_at_s": since(late_loop), "rule": f"its event loop >= {LOADGEN_LAG_S * 1000:.0f} ms late",
                           "worst_lag_ms": round(max(lags) * 1000, 1) if lags else None},
        # 5xx answers not put down to the database (the logs will say what failed).
        "server_errors": {"first_at_s": since(fives[0]) if fives and not refused else None, "http_5xx": len(fives)},
    }


def _first_limit(limits: dict[str, dict[str, Any]]) -> str | None:
    """The resource that ran out first (None: none did)."""
    hit = [(v["first_at_s"], name) for name, v in limits.items() if v.get("first_at_s") is not None]
    return min(hit)[1] if hit else None


def _missed(r: dict[str, Any]) -> list[str]:
    """What of the target a run missed (empty: met)."""
    out = []
    if r["errors"]:
        out.append(f"errors: {r['errors']} {r['errors_by_kind']}")
    if r["unplaced"]:
        out.append(f"unplaced participants: {r['unplaced']}")
    if r["groups_completed"] < r["config"]["groups"]:
        out.append(f"groups completed: {r['groups_completed']} of {r['config']['groups']}")
    if r["groups_stalled"]:
        out.append(f"groups stalled: {len(r['groups_stalled'])}")
    for key, name in (("ack_ms", "ack"), ("phase_change_ms", "phase change")):
        p99 = r[key]["p99"]
        if p99 is not None and p99 >= TARGET_P99_MS:
            out.append(f"{name} p99 {p99} ms >= {TARGET_P99_MS:.0f} ms")
    return out


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
        lines.append((f"Scenario {c['scenario']}. " if c.get("scenario") else "")
                     + f"Run: {c['participants']} participants in {c['groups']} groups ({c.get('synthetic_humans')} synthetic humans, "
                     f"{c['humans_per_group']} humans "
                     f"+ bots; {c['bot_seats']} scripted bot seats), {c['rounds']} rounds, phases {c['phase_seconds']} s, "
                     f"time scale {c['time_scale']}, ramp {c['ramp_seconds']} s, {c['uvicorn_workers']} uvicorn workers, "
                     f"Celery concurrency {c['celery_concurrency']}; database pool {c.get('db_pool') or 'none'}")
    if "ack_ms" in r:
        cpu, busy, ws, res = r["cpu"], r["busy"], r["websocket"], r["resources"]
        db, red = res["db_connections"], res["redis_clients"]
        if not busy["clients"]:
            busy_text = "none"
        else:
            fate = ("all retried and placed" if not busy["clients_lost"]
                    else f"{busy['clients_placed']} retried and placed, {busy['clients_lost']} LOST")
            busy_text = (f"{busy['http_503']} HTTP 503 + {busy['websocket']} websocket to {busy['clients']} people: {fate} "
                         f"(longest wait {busy['longest_wait_s']} s)")
        pages = r["http_status_by_page"]
        limits = r["limits"]
        lines += [
            f"Groups completed: {r['groups_completed']} of {r['config']['groups']}; stalled: {len(r['groups_stalled'])}; "
            f"unplaced participants: {r['unplaced']}",
            f"Decisions: {r['decisions']} (actions acked: {r['actions']}); errors: {r['errors']} {r['errors_by_kind'] or ''}",
            f"HTTP answers by status: {r['http_status']} (join link {pages.get('join', {})}, game page {pages.get('play', {})}); "
            f"5xx other than busy: {r['http_5xx']}",
            f"Busy answers: {busy_text}",
            f"People who never got a seat: {r['never_seated']}; gave up: {r['gave_up']}; websocket reconnections: "
            f"{ws['reconnections']}, failed to open: {ws['failed_to_open']}, closed by the server: {ws['closed_by_server'] or 'none'}",
            f"DB connections to {db['database']} (pg_stat_activity): peak {db['peak']} (active {db['peak_active']}, idle in "
            f"transaction {db['peak_idle_in_transaction']}), mean {db['mean']}; whole server peak {db['server_peak']} of "
            f"max_connections {db['max_connections']}; 'too many clients' in server logs: {db['refused_in_server_logs']}",
            f"Redis clients: peak {red['db_peak']} on db {r['config'].get('redis_db', '?')}, {red['server_peak']} on the server "
            f"(maxclients {red['maxclients']})",
            f"GET /healthz (web event loop): {ms(res['healthz_ms'])}; unanswered: {res['healthz_failed']}",
            f"Load generator loop lag:  {ms(res['load_generator_lag_ms'])}",
            "Limits reached (s after start): " + ", ".join(f"{name} {v['first_at_s'] if v['first_at_s'] is not None else '-'}"
                                                            for name, v in limits.items())
            + f"; first: {r['first_limit'] or 'none'}"
            + (f" ({', '.join(limits['db_connections']['why'])})" if r["first_limit"] == "db_connections" else ""),
            f"Action → ack:             {ms(r['ack_ms'])}",
            f"Last decision → group:    {ms(r['phase_change_ms'])}",
            f"  of which until the view: {ms(r['phase_change_to_view_ms'])}",
            f"  view built → client:     {ms(r['phase_change_view_to_client_ms'])}",
            f"Deadline → group:         {ms(r['phase_change_after_deadline_ms'])}",
            "CPU (cores busy): " + ", ".join(f"{k.removesuffix('_cores')} {v}" for k, v in cpu.items() if k.endswith("_cores")),
            "Timeline (s: actions, ack p99 ms | cores: ours, other programs | busy answers, db connections max): " + "  ".join(
                f"{t['t']}: {t['actions']}, {t['ack_p99_ms']} | {t['ours_cores']}, {t['other_programs_cores']} | "
                f"{t['busy']}, {t['db_connections_max']}" for t in r["timeline"]),
            f"Run {r['duration_s']} s; total {r['total_s']} s; server log problems: {r['server_log_problems']}",
            ("TARGET MET (p99 < 200 ms, no errors, no unplaced participants, every group completed, none stalled)"
             if r["target_met"] else "TARGET MISSED: " + "; ".join(r["target_missed"])),
        ]
        lines += [f"  error: {e['code']}: {e['message']}" for e in r["error_examples"]]
        lines += [f"  stalled: {s}" for s in r["groups_stalled"][:10]]
    if "logs" in r:
        lines.append(f"Logs: {r['logs']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
