"""Fault benchmark: a study's bad day on the production stack, injected on a schedule and counted.

Starts, on 127.0.0.1 only: its own redis-server (a port of its own, nothing kept on disk, so restarting it
touches no other program's Redis), a dedicated PostgreSQL database (created, migrated, dropped), uvicorn
with ``--workers 2`` and ``config.settings.production``, a Celery worker and a separate Celery beat, and the
fake OpenAI-compatible server (``bots.fake_openai``, real HTTP) that plays every bot seat's model. Synthetic
humans (``experiment.simulation``) join over HTTP and play over real websockets, and while they play it
injects, at the times it prints:

- ``kill -9`` of the Celery worker while LLM requests are in flight, restarted a few seconds later (twice);
- ``kill -9`` of one uvicorn worker mid-phase (uvicorn's supervisor starts a new one; clients reconnect);
- ``kill -9`` of Redis, started again (empty: queued tasks and channel subscriptions are gone);
- ``--dropout-share`` of the human seats closing their tab for good, each at a random phase;
- model faults in rotation on every ``--fault-every``-th request: a timeout, 429 with Retry-After, 500, a
  malformed (non-JSON) body, an answer that breaks the game's rules, a refusal.

Then it checks, and prints each check with its count and target:

- every group completed;
- acknowledged decisions missing from the database: 0 (every ``ack`` a client got has its row);
- decisions stored twice: 0 (per seat and round, per table);
- dropouts as the experiment's policy says: each person who left is marked dropped (or finished, when
  fewer than ``dropout_after`` of their decisions were left), with its ``participant.dropped`` event, and
  their later decisions are the recorded defaults; nobody who stayed was dropped;
- every model fault served is in the LLM call log with its kind (a request cut off by the worker's kill
  stays ``pending`` and is counted apart);
- presence after the web crash: once the presence heartbeat's staleness window has passed, the cockpit's
  count of each person's open connections equals the connections the clients really hold, and at the end
  nobody is counted online;
- no phase open past its deadline by more than ``--overdue-limit`` s once the stack is whole again;
- no traceback in any log (uvicorn, Celery worker and beat).

Exit 0 only when every check holds; 1 otherwise; 3 when the stack could not be started.

    .venv/bin/python bench/faults.py                 # 20 groups, 5 rounds
    .venv/bin/python bench/faults.py --groups 30 --json
    .venv/bin/python bench/faults.py --keep-logs     # keep the processes' logs (also kept on failure)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import HOST, Proc, _port_free, _recreate_database, close_run, run_step  # noqa: E402

FAULT_KINDS = ("timeout", "rate_limit", "server_error", "malformed", "rule_breaking", "refusal")
# What the LLM call log must say about each kind (LLMCall.error_class).
LOGGED_AS = {"timeout": "APITimeoutError", "rate_limit": "RateLimitError", "server_error": "InternalServerError",
             "malformed": "MalformedReply", "rule_breaking": "InvalidAnswer", "refusal": "Refusal"}
DECISION_ACTIONS = ("pitch.submit", "choice.submit", "return.submit", "belief.submit")


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=20, help="groups (5 synthetic humans and 2 LLM bots each; default 20)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--phase-seconds", type=int, default=20, help="deadline of the decision phases (feedback: a quarter)")
    p.add_argument("--time-scale", type=float, default=0.25, help="multiplies the synthetic humans' thinking times")
    p.add_argument("--ramp-seconds", type=float, default=10.0, help="arrivals spread over this long")
    p.add_argument("--dropout-share", type=float, default=0.3, help="share of human seats that leave for good")
    p.add_argument("--fault-every", type=int, default=3, help="every n-th model request gets the next fault")
    p.add_argument("--llm-latency", type=float, default=0.3, help="the fake model's latency, seconds")
    p.add_argument("--llm-timeout", type=float, default=3.0, help="the bot profile's request timeout, seconds")
    p.add_argument("--overdue-limit", type=float, default=5.0,
                   help="longest a phase may stay open past its deadline once the stack is whole, seconds")
    p.add_argument("--presence-stale", type=float, default=20.0,
                   help="PARTNERLAB_PRESENCE_STALE_SECONDS of the server: when a dead process's connections are gone")
    p.add_argument("--port", type=int, default=8660)
    p.add_argument("--redis-port", type=int, default=6390)
    p.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432")
    p.add_argument("--database", default="partnerlab_faults")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--duration-limit", type=float, default=900.0, help="the whole run, seconds")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(list(argv) if argv is not None else None)
    if not 0 <= args.dropout_share < 1:
        p.error("--dropout-share must be in [0, 1).")
    return args


# ---- processes -----------------------------------------------------------------------------------------

class Stack:
    """The processes of the run, started and killed by name; each kill and start is logged with its time."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], logs: Path) -> None:
        self.args, self.env, self.logs = args, env, logs
        self.procs: dict[str, Proc] = {}
        self.old: list[Proc] = []  # killed processes: their logs are read too
        self.log: list[dict[str, Any]] = []
        self.t0 = time.time()
        self._starts: Counter[str] = Counter()
        self._lock = threading.RLock()  # the supervisor and the injector both start and kill
        self.unexpected_exits: list[dict[str, Any]] = []  # processes that ended on their own, restarted
        self._halt = threading.Event()

    def supervise(self) -> None:
        """Do what production's supervisor does (docs/deployment.md): restart a process that ended on its own. (A
        Celery worker whose Redis connection dropped during a task used to exit, kombu 5.7's "Unrecoverable error";
        config/broker.py guards that now, so any exit listed here is a new defect.)"""
        def loop() -> None:
            while not self._halt.wait(1.0):
                with self._lock:
                    for name, proc in list(self.procs.items()):
                        if not proc.running():
                            self.unexpected_exits.append({"t": round(time.time() - self.t0, 1), "process": proc.name,
                                                          "exit": proc.popen.returncode})
                            self.note(f"{proc.name} exited on its own ({proc.popen.returncode}); the supervisor "
                                      "restarts it")
                            self.old.append(self.procs.pop(name))
                            self.start(name)

        threading.Thread(target=loop, name="supervisor", daemon=True).start()

    def note(self, what: str, **extra: Any) -> None:
        self.log.append({"t": round(time.time() - self.t0, 1), "what": what, **extra})
        if not self.args.json:
            print(f"[{time.time() - self.t0:6.1f} s] {what}", file=sys.stderr, flush=True)

    def argv(self, name: str) -> list[str]:
        py, work = sys.executable, self.logs
        return {
            "redis": ["redis-server", "--port", str(self.args.redis_port), "--bind", HOST, "--save", "", "--appendonly", "no"],
            "web": [py, "-m", "uvicorn", "config.asgi:application", "--host", HOST, "--port", str(self.args.port),
                    "--workers", "2", "--lifespan", "on", "--log-level", "warning", "--no-access-log"],
            "worker": [py, "-m", "celery", "-A", "config", "worker", "--concurrency", "2", "--loglevel", "WARNING",
                       "--without-gossip", "--without-mingle", "-n", f"faults-{os.getpid()}@%h"],
            "beat": [py, "-m", "celery", "-A", "config", "beat", "--loglevel", "WARNING",
                     "--schedule", str(work / "beat-schedule")],
        }[name]

    def start(self, name: str) -> None:
        with self._lock:
            self._starts[name] += 1
            label = name if self._starts[name] == 1 else f"{name}-{self._starts[name]}"
            self.procs[name] = Proc(label, self.argv(name), env=self.env, logs=self.logs)

    def kill(self, name: str) -> None:
        with self._lock:
            proc = self.procs.pop(name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pgid, signal.SIGKILL)
            proc.popen.wait(timeout=10)
            self.old.append(proc)

    def web_children(self) -> list[int]:
        master = self.procs["web"].pgid
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == master and b"spawn_main" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
        return sorted(found)

    def all(self) -> list[Proc]:
        return [*self.old, *self.procs.values()]

    def stop(self) -> None:
        self._halt.set()
        with self._lock:
            for proc in reversed(list(self.procs.values())):
                proc.stop()


def wait_until(check: Callable[[], bool], timeout: float, every: float = 0.25) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(Exception):
            if check():
                return True
        time.sleep(every)
    return False


def redis_up(port: int) -> bool:
    import redis

    client = redis.Redis(host=HOST, port=port, socket_timeout=1)
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def web_up(port: int) -> bool:
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def worker_up() -> bool:
    from config.celery import app

    return bool(app.control.ping(timeout=1.0))


# ---- the model and its faults ----------------------------------------------------------------------------

def _break_rules(value: Any) -> Any:
    """The same answer with every text far too long and every number far out of range."""
    if isinstance(value, dict):
        return {k: _break_rules(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_break_rules(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return 10**6
    if isinstance(value, str):
        return "x" * 5000
    return value


class ModelFaults:
    """The fake model's responder: every ``every``-th request gets the next fault kind, the rest a valid answer.
    Records what it served, keyed by the exact messages, so the call log can be checked against it."""

    def __init__(self, *, every: int, timeout: float) -> None:
        self.every, self.timeout = max(1, every), timeout
        self.served: list[dict[str, Any]] = []
        self._n = 0
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> Any:
        from bots.fake_openai import Reply, auto_content

        with self._lock:
            self._n += 1
            n = self._n
        kind = FAULT_KINDS[(n // self.every - 1) % len(FAULT_KINDS)] if n % self.every == 0 else "ok"
        self.served.append({"at": time.time(), "kind": kind, "key": json.dumps(request.get("messages"), sort_keys=True)})
        if kind == "timeout":
            return Reply.slow(self.timeout + 2.0)
        if kind == "rate_limit":
            return Reply.error(429, retry_after=1)
        if kind == "server_error":
            return Reply.error(500)
        if kind == "malformed":
            return Reply.broken(b'{"id": "x", "choices": [{"message": ')
        if kind == "rule_breaking":
            return Reply.text(json.dumps(_break_rules(json.loads(auto_content(request)))))
        if kind == "refusal":
            return Reply.refuse()
        return None  # the fake's own valid answer


# ---- the run ---------------------------------------------------------------------------------------------

def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    for port in (args.port, args.redis_port):
        if not _port_free(port):
            raise SystemExit(f"Port {port} on {HOST} is in use; choose another (--port, --redis-port).")
    work = Path(tempfile.mkdtemp(prefix="partnerlab-faults-"))
    redis_url = f"redis://{HOST}:{args.redis_port}/0"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PARTNERLAB_", "CELERY_"))},
           "DJANGO_SETTINGS_MODULE": "config.settings.production", "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
           "DJANGO_ALLOWED_HOSTS": HOST, "DJANGO_SECURE_SSL_REDIRECT": "0",
           "DATABASE_URL": f"{args.postgres.rstrip('/')}/{args.database}", "REDIS_URL": redis_url,
           "DJANGO_STATIC_ROOT": str(work / "static"), "PARTNERLAB_VAR_DIR": str(work / "var"),
           "PARTNERLAB_PRESENCE_STALE_SECONDS": f"{args.presence_stale:g}",
           "PARTNERLAB_PRESENCE_HEARTBEAT_SECONDS": f"{max(1.0, args.presence_stale / 3):g}", "PYTHONUNBUFFERED": "1"}
    stack = Stack(args, env, work)
    report: dict[str, Any] = {"command": " ".join(["bench/faults.py", *(argv if argv is not None else sys.argv[1:])]),
                              "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    code = 3
    fake = None
    try:
        stack.start("redis")
        if not wait_until(lambda: redis_up(args.redis_port), 15):
            raise SystemExit("redis-server did not start:\n" + stack.procs["redis"].tail())
        _recreate_database(args.postgres, args.database)
        py = sys.executable
        run_step([py, "manage.py", "migrate", "--noinput", "-v0"], env=env, timeout=180)
        run_step([py, "manage.py", "collectstatic", "--noinput", "-v0"], env=env, timeout=180)
        os.environ.update(env)
        import django

        django.setup()
        from bots.fake_openai import FakeOpenAI

        faults = ModelFaults(every=args.fault_every, timeout=args.llm_timeout)
        fake = FakeOpenAI(latency=args.llm_latency).start()
        fake.responder = faults
        session, experiment = _setup(args, fake.base_url)
        for name in ("web", "worker", "beat"):
            stack.start(name)
        if not (wait_until(lambda: web_up(args.port), 60) and wait_until(worker_up, 60)):
            raise SystemExit("The stack did not become ready within 60 s:\n"
                             + "\n".join(f"--- {p.name}\n{p.tail()}" for p in stack.all()))
        code = 1
        stack.t0 = time.time()
        stack.supervise()
        clients = args.groups * experiment.n_humans
        rng = random.Random(args.seed)
        decision_phases = [(r, ph) for r in range(1, args.rounds + 1) for ph in ("pitch", "choice", "return")]
        leave_at = {i: rng.choice(decision_phases) for i in rng.sample(range(clients), round(args.dropout_share * clients))}
        stack.note(f"{args.groups} groups: {clients} synthetic humans ({len(leave_at)} will leave for good), "
                   f"{args.groups * (experiment.n_selectors + experiment.n_candidates - experiment.n_humans)} LLM bots")
        watch = Watch(session.pk)
        watch.start()
        injector = Injector(args, stack, faults, session.pk)
        injector.start()
        time_limit = max(60.0, args.duration_limit - (time.monotonic() - started) - 120)
        reports = _drive(args, session.code, clients, experiment, leave_at, time_limit)
        stack.note("all clients done")
        injector.join(timeout=120)
        from experiment.models import Group

        wait_until(lambda: not Group.objects.filter(session=session).exclude(status=Group.Status.FINISHED).exists(), 60)
        end_presence = _presence_at_end(session.pk, args.presence_stale + 15)
        watch.stop()
        report["schedule"] = stack.log
        report["checks"] = _checks(args, session, experiment, reports, leave_at, faults, stack, watch, injector,
                                   end_presence)
        report["llm_calls"] = _call_summary(session.pk)
        report["served"] = dict(Counter(s["kind"] for s in faults.served))
        report["unexpected_exits"] = stack.unexpected_exits
        report["ok"] = all(c["ok"] for c in report["checks"].values())
        code = 0 if report["ok"] else 1
    except KeyboardInterrupt as exc:
        report["aborted"] = str(exc) or "interrupted"
    finally:
        stack.stop()
        close_run(report, started=started, work=work, keep_logs=args.keep_logs, code=code, postgres=args.postgres,
                  database=args.database, fake=fake)
    print(json.dumps(report, indent=2, default=str) if args.json else _text(report))
    return code


def _setup(args: argparse.Namespace, base_url: str) -> tuple[Any, Any]:
    from bots.models import BotProfile
    from experiment.models import Condition, Experiment, Session

    s = args.phase_seconds
    profile = BotProfile.objects.create(name="fault benchmark", base_url=base_url, api_key_env="", requires_key=False,
                                        model="fake-model", timeout_seconds=args.llm_timeout, max_retries=2,
                                        delay_min=0.5, delay_max=1.0, typing_cps=500)
    experiment = Experiment.objects.create(
        name="Fault benchmark", slug="faults", n_rounds=args.rounds, pitch_seconds=s, choice_seconds=s,
        return_seconds=s, belief_seconds=s, feedback_seconds=max(1, s // 4), belief_rounds="last",
        lobby_timeout_seconds=int(args.ramp_seconds) + 120)
    for name, disclosed in (("hidden", False), ("disclosed", True)):
        Condition.objects.create(experiment=experiment, name=name, disclose_identity=disclosed, bot_profile=profile)
    session = Session.objects.create(experiment=experiment, label="fault benchmark", seed=args.seed,
                                     capacity=args.groups * experiment.n_humans)
    return session, experiment


def _drive(args: argparse.Namespace, code: str, clients: int, experiment: Any, leave_at: dict[int, tuple[int, str]],
           time_limit: float) -> list[Any]:
    import dataclasses

    from bots.synthetic import SyntheticHuman, SyntheticParams
    from experiment.simulation import run_clients

    params = SyntheticParams()
    human = SyntheticHuman(dataclasses.replace(params, speed=params.speed * args.time_scale),
                           quiz_key={str(i): q["answer"] for i, q in enumerate(experiment.quiz)})
    return asyncio.run(run_clients(base_url=f"http://{HOST}:{args.port}", code=code, count=clients, human=human,
                                   seed=args.seed, group_size=experiment.n_humans, ordered=False,
                                   ramp_seconds=args.ramp_seconds, time_limit=time_limit, leave_at=leave_at))


class Watch(threading.Thread):
    """Once a second: how far past its deadline the most overdue open phase of the session is."""

    def __init__(self, session_id: int) -> None:
        super().__init__(name="watch", daemon=True)
        self.session_id = session_id
        self.series: list[tuple[float, float]] = []  # (epoch, seconds overdue; 0 when none is)
        self._halt = threading.Event()

    def run(self) -> None:
        from django.db import connection
        from django.db.models import Min
        from django.utils import timezone

        from experiment.models import Group

        while not self._halt.wait(1.0):
            with contextlib.suppress(Exception):
                now = timezone.now()
                oldest = (Group.objects.filter(session_id=self.session_id, status=Group.Status.PLAYING,
                                               phase_deadline__lt=now).aggregate(m=Min("phase_deadline"))["m"])
                self.series.append((time.time(), (now - oldest).total_seconds() if oldest else 0.0))
        connection.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


class Injector(threading.Thread):
    """The faults, on a schedule relative to the first arrival. Each waits for its moment (the worker's kill for
    a model request in flight), strikes, and brings the stack back; the windows until it is whole are kept."""

    def __init__(self, args: argparse.Namespace, stack: Stack, faults: ModelFaults, session_id: int) -> None:
        super().__init__(name="injector", daemon=True)
        self.args, self.stack, self.faults, self.session_id = args, stack, faults, session_id
        self.windows: list[tuple[str, float, float]] = []  # (fault, struck at, whole again at), epoch seconds
        self.worker_kills: list[float] = []
        self.presence: list[dict[str, Any]] = []  # snapshots of each person's counted connections
        self.failures: list[str] = []

    def at(self, seconds: float) -> None:
        """Wait until ``seconds`` after the first arrival."""
        self.until(self.stack.t0 + seconds)

    @staticmethod
    def until(epoch: float) -> None:
        time.sleep(max(0.0, epoch - time.time()))

    def run(self) -> None:
        try:
            self.at(self.args.ramp_seconds + 15)
            self.kill_worker()
            self.at(self.args.ramp_seconds + 35)
            self.kill_web()
            self.until(self.windows[-1][1] + 3)
            self.presence.append(self.snapshot("3 s after the web crash"))
            self.until(self.windows[-1][1] + self.args.presence_stale + 10)
            self.presence.append(self.snapshot(f"{self.args.presence_stale + 10:g} s after the web crash"))
            self.restart_redis()
            self.until(self.windows[-1][2] + 20)
            self.kill_worker()
        except Exception as exc:  # reported as a failed check, never silently
            self.failures.append(f"{type(exc).__name__}: {exc}")
            self.stack.note(f"injector failed: {exc}")
        finally:
            from django.db import connection

            connection.close()

    def _in_flight(self) -> int:
        """Model requests sent less than the model's latency ago: not yet answered."""
        now = time.time()
        return sum(now - s["at"] < self.args.llm_latency for s in self.faults.served[-50:])

    def kill_worker(self) -> None:
        wait_until(lambda: self._in_flight() > 0, 20, every=0.05)
        flying = self._in_flight()
        struck = time.time()
        self.stack.kill("worker")
        self.worker_kills.append(struck)
        self.stack.note(f"kill -9 Celery worker ({flying} model requests in flight)")
        time.sleep(4)
        self.stack.start("worker")
        if not wait_until(worker_up, 60):
            self.failures.append("the restarted Celery worker did not answer within 60 s")
        self.stack.note("Celery worker restarted and answering")
        self.windows.append(("worker", struck, time.time()))

    def kill_web(self) -> None:
        children = self.stack.web_children()
        if not children:
            raise RuntimeError("no uvicorn worker process found")
        struck = time.time()
        os.kill(children[0], signal.SIGKILL)
        self.stack.note(f"kill -9 uvicorn worker {children[0]} (of {len(children)})")
        if not wait_until(lambda: len(set(self.stack.web_children()) - {children[0]}) >= len(children), 30):
            self.failures.append("uvicorn did not start a new worker within 30 s")
        wait_until(lambda: web_up(self.args.port), 30)
        self.stack.note(f"uvicorn workers back: {self.stack.web_children()}")
        self.windows.append(("web", struck, time.time()))

    def restart_redis(self) -> None:
        struck = time.time()
        self.stack.kill("redis")
        self.stack.note("kill -9 Redis")
        time.sleep(2)
        self.stack.start("redis")
        if not wait_until(lambda: redis_up(self.args.redis_port), 15):
            self.failures.append("Redis did not come back within 15 s")
        self.stack.note("Redis started again (empty)")
        self.windows.append(("redis", struck, time.time()))

    def snapshot(self, label: str) -> dict[str, Any]:
        from experiment.models import Participant

        counted = dict(Participant.objects.filter(session_id=self.session_id, controller=Participant.Controller.PERSON)
                       .values_list("token", "connections"))
        self.stack.note(f"presence snapshot, {label}: {sum(counted.values())} connections counted")
        return {"label": label, "at": time.time(), "counted": counted}


def _presence_at_end(session_id: int, timeout: float) -> dict[str, Any]:
    """After every client has closed its tab: how long until nobody is counted online (at most ``timeout``)."""
    from experiment.models import Participant

    began = time.time()
    people = Participant.objects.filter(session_id=session_id, controller=Participant.Controller.PERSON)
    cleared = wait_until(lambda: not people.filter(connections__gt=0).exists(), timeout, every=1.0)
    return {"cleared": cleared, "seconds": round(time.time() - began, 1),
            "still_online": people.filter(connections__gt=0).count()}


# ---- checks ----------------------------------------------------------------------------------------------

def _guarded(fn: Callable[..., dict[str, Any]], *a: Any, **kw: Any) -> dict[str, Any]:
    """A check that failed to run is a failed check, and the others still run."""
    try:
        return fn(*a, **kw)
    except Exception as exc:
        return _check(False, None, "the check to run", error=f"{type(exc).__name__}: {exc}")


def _check(ok: bool, value: Any, target: str, **detail: Any) -> dict[str, Any]:
    return {"ok": bool(ok), "value": value, "target": target, **({"detail": detail} if detail else {})}


def _checks(args: argparse.Namespace, session: Any, experiment: Any, reports: list[Any], leave_at: dict[int, Any],
            faults: ModelFaults, stack: Stack, watch: Watch, injector: Injector, end_presence: dict[str, Any]) -> dict[str, Any]:
    from experiment.models import Event, Group, Participant

    groups = Group.objects.filter(session=session)
    finished = groups.filter(status=Group.Status.FINISHED).count()
    people = {p.token: p for p in Participant.objects.filter(session=session, controller=Participant.Controller.PERSON)}
    checks: dict[str, Any] = {}
    checks["injected"] = _check(not injector.failures and len(injector.windows) == 4, len(injector.windows),
                                "4 process faults injected (worker twice, web, Redis), each recovered",
                                failures=injector.failures)
    checks["groups_completed"] = _check(finished == args.groups == groups.count(), f"{finished}/{groups.count()}",
                                        f"{args.groups}/{args.groups}")
    unplaced = [r.index for r in reports if r.token not in people or people[r.token].group_id is None]
    lost = [r.index for r in reports if r.index not in leave_at and not r.completed]
    checks["people_lost"] = _check(not unplaced and not lost, len(unplaced) + len(lost),
                                   "0 (everyone who stayed reached the end)", unplaced=unplaced[:10],
                                   not_at_end=[(r.index, r.stage, r.errors[-1:]) for r in reports if r.index in lost][:10])
    checks["acked_missing"] = _guarded(_missing_acked, reports, people)
    checks["stored_twice"] = _guarded(_stored_twice, session.pk)
    checks["dropouts"] = _guarded(_dropouts, experiment, reports, leave_at, people)
    checks["model_faults_logged"] = _guarded(_faults_logged, faults, injector.worker_kills, args.llm_timeout + 3)
    checks["presence_after_crash"] = _guarded(_presence_check, injector.presence[-1:], reports)
    checks["presence_at_end"] = _check(end_presence["cleared"], end_presence["still_online"],
                                       "0 people counted online once everyone has left", seconds=end_presence["seconds"])
    overdue = _overdue_when_whole(watch.series, injector.windows, grace=args.overdue_limit)
    checks["phases_on_time"] = _check(overdue <= args.overdue_limit, round(overdue, 1),
                                      f"≤ {args.overdue_limit:g} s past a deadline once the stack is whole",
                                      worst_during_faults=round(max((s for _, s in watch.series), default=0.0), 1))
    chains = {p.name: _tracebacks(p.log_path.read_text(errors="replace")) for p in stack.all()}
    unhandled = {name: [c for c in found if not OUTAGE.search(c)] for name, found in chains.items()}
    checks["no_tracebacks"] = _check(
        not any(unhandled.values()), sum(map(len, unhandled.values())),
        "0 tracebacks other than a library's report of Redis being down",
        by_log={name: len(found) for name, found in unhandled.items()},
        redis_outage_reports={name: len(found) - len(unhandled[name]) for name, found in chains.items()},
        first=next((f"{name}: {found[0]}" for name, found in unhandled.items() if found), ""))
    checks["events_logged"] = _check(True, Event.objects.filter(session=session).count(), "(for reference)")
    return checks


def _missing_acked(reports: list[Any], people: dict[str, Any]) -> dict[str, Any]:
    from experiment.models import Belief, Choice, Message, Return

    expected: Counter[tuple[str, int, str]] = Counter()
    for r in reports:
        for a in r.actions:
            if a.action in DECISION_ACTIONS and a.latency is not None and not a.error and r.token in people:
                expected[(r.token, a.round, a.action)] += 1
    missing = []
    for (token, rnd, action), n in expected.items():
        p = people[token]
        if action == "belief.submit":  # one message holds the guesses about every candidate
            stored = int(Belief.objects.filter(selector=p, round_number=rnd, timed_out=False).exists())
        else:
            stored = {"pitch.submit": Message.objects.filter(candidate=p, round_number=rnd),
                      "choice.submit": Choice.objects.filter(selector=p, round_number=rnd),
                      "return.submit": Return.objects.filter(candidate=p, choice__round_number=rnd),
                      }[action].filter(timed_out=False).count()
        if stored < n:
            missing.append({"seat": p.seat, "group": p.group_id, "round": rnd, "action": action, "acked": n, "stored": stored})
    return _check(not missing, len(missing), f"0 of {sum(expected.values())} acknowledged decisions", first=missing[:10])


def _stored_twice(session_id: int) -> dict[str, Any]:
    from django.db.models import Count

    from bots.models import BotDecision
    from experiment.models import Belief, Choice, Message, Return

    keyed = {"messages": (Message, ("candidate", "round_number"), "candidate__session_id"),
             "choices": (Choice, ("selector", "round_number"), "selector__session_id"),
             "returns": (Return, ("choice",), "candidate__session_id"),
             "beliefs": (Belief, ("selector", "candidate", "round_number"), "selector__session_id"),
             "bot_decisions": (BotDecision, ("participant", "round_number", "phase"), "participant__session_id")}
    twice = {name: model.objects.filter(**{scope: session_id}).values(*key).annotate(n=Count("id")).filter(n__gt=1).count()
             for name, (model, key, scope) in keyed.items()}
    return _check(not any(twice.values()), sum(twice.values()), "0", by_table=twice)


def _dropouts(experiment: Any, reports: list[Any], leave_at: dict[int, Any], people: dict[str, Any]) -> dict[str, Any]:
    from experiment.models import Choice, Event, Message, Participant, Return

    P = Participant.Status
    dropped_events = set(Event.objects.filter(session_id=next(iter(people.values())).session_id,
                                              type="participant.dropped").values_list("participant_id", flat=True))
    wrong: list[dict[str, Any]] = []
    marked = finished = 0
    for r in reports:
        p = people.get(r.token)
        if p is None:
            continue
        if r.index not in leave_at:
            if p.status == P.DROPPED:
                wrong.append({"seat": p.seat, "group": p.group_id, "why": "dropped though they stayed"})
            continue
        if r.left_at is None:
            wrong.append({"seat": p.seat, "group": p.group_id, "why": f"never reached {leave_at[r.index]} to leave"})
            continue
        left_round = r.left_phase[0]
        later = [*Message.objects.filter(candidate=p, round_number__gt=left_round),
                 *Choice.objects.filter(selector=p, round_number__gt=left_round),
                 *Return.objects.filter(candidate=p, choice__round_number__gt=left_round)]
        acted = [row for row in later if not row.timed_out]
        if p.status == P.DROPPED:
            marked += 1
            if p.pk not in dropped_events:
                wrong.append({"seat": p.seat, "group": p.group_id, "why": "dropped without a participant.dropped event"})
        elif len(later) < experiment.dropout_after:
            finished += 1  # too few decisions were left to miss: the game ended first (they stay where they left)
        else:
            wrong.append({"seat": p.seat, "group": p.group_id, "why": f"status {p.status} after leaving in {r.left_phase}"
                                                                         f" with {len(later)} decisions owed later"})
        if acted and experiment.dropout_policy != experiment.DropoutPolicy.BOT:
            wrong.append({"seat": p.seat, "group": p.group_id, "why": f"{len(acted)} decisions made after leaving"})
    return _check(not wrong, len(wrong), f"0 ({experiment.dropout_policy}: dropped after {experiment.dropout_after} "
                                         "missed decisions, defaults from then on)",
                  left=len(leave_at), marked_dropped=marked, game_ended_first=finished, first=wrong[:10])


def _faults_logged(faults: ModelFaults, kills: list[float], flight: float) -> dict[str, Any]:
    from bots.models import LLMCall

    logged: dict[str, Counter[str]] = defaultdict(Counter)
    for messages, error_class in LLMCall.objects.exclude(purpose=LLMCall.Purpose.PROFILE_TEST).values_list(
            "request_messages", "error_class"):
        logged[json.dumps(messages, sort_keys=True)][error_class] += 1
    served: dict[str, Counter[str]] = defaultdict(Counter)
    at: dict[str, list[float]] = defaultdict(list)
    for s in faults.served:
        if s["kind"] != "ok":
            served[s["key"]][LOGGED_AS[s["kind"]]] += 1
            at[s["key"]].append(s["at"])
    missing, interrupted = Counter(), 0
    for key, wanted in served.items():
        short = wanted - logged.get(key, Counter())
        for cls, n in short.items():
            # A request whose worker was killed before the reply came is logged as sent (pending), never answered.
            cut = sum(any(0 <= k - t <= flight for k in kills) for t in at[key])
            interrupted += min(n, cut)
            if n > cut:
                missing[cls] += n - cut
    total = sum(sum(c.values()) for c in served.values())
    return _check(not missing, sum(missing.values()), f"0 of {total} model faults served",
                  missing_by_kind=dict(missing), cut_off_by_a_worker_kill=interrupted,
                  pending_rows=LLMCall.objects.filter(status=LLMCall.Status.PENDING).count())


def _presence_check(snapshots: list[dict[str, Any]], reports: list[Any], margin: float = 2.0) -> dict[str, Any]:
    """The counted connections of each person against the websockets their client really held at that moment
    (people whose client opened or closed one within ``margin`` seconds of it are left out: in flux)."""
    if not snapshots:
        return _check(False, None, "a snapshot after the web crash", detail="no snapshot was taken")
    snap = snapshots[-1]
    t = snap["at"]
    wrong, compared = [], 0
    for r in reports:
        if r.token not in snap["counted"]:
            continue
        if any(abs(w.at - t) < margin or (w.closed_at is not None and abs(w.closed_at - t) < margin) for w in r.ws):
            continue
        held = sum(w.opened and w.at <= t and (w.closed_at is None or w.closed_at > t) for w in r.ws)
        compared += 1
        if snap["counted"][r.token] != held:
            wrong.append({"client": r.index, "counted": snap["counted"][r.token], "held": held})
    return _check(not wrong, len(wrong), f"0 of {compared} people miscounted ({snap['label']})", first=wrong[:10])


def _overdue_when_whole(series: list[tuple[float, float]], windows: list[tuple[str, float, float]], *, grace: float) -> float:
    def faulty(t: float) -> bool:
        return any(struck <= t <= whole + grace for _, struck, whole in windows)

    return max((s for t, s in series if not faulty(t)), default=0.0)


# The last line of a traceback chain that is a connection to Redis (the broker or the channel layer) failing.
OUTAGE = re.compile(r"^(redis\.exceptions\.ConnectionError|ConnectionRefusedError|ConnectionResetError"
                    r"|kombu\.exceptions\.OperationalError|celery\.beat\.SchedulingError): "
                    r".*(Error 111|Connection refused|Connect call failed|closed by server|reset by peer|Connection has data)")


def _tracebacks(text: str) -> list[str]:
    """Each traceback chain of a log (chained ones, "During handling …", count once) as its last line."""
    lines, found, i = text.splitlines(), [], 0
    while i < len(lines):
        if not lines[i].startswith("Traceback (most recent call last)"):
            i += 1
            continue
        last = ""
        while i < len(lines):
            i += 1
            while i < len(lines) and (not lines[i] or lines[i].startswith(" ")):
                i += 1
            if i < len(lines):
                last = lines[i]
            # A chained traceback continues after "During handling …" / "The above exception …".
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and lines[j].startswith(("During handling", "The above exception")):
                i = j + 1
                while i < len(lines) and not lines[i].startswith("Traceback"):
                    i += 1
                continue
            break
        found.append(last.strip())
        i += 1
    return found


def _call_summary(session_id: int) -> dict[str, Any]:
    from django.db.models import Count

    from bots.models import BotDecision, LLMCall

    return {"calls_by_status": dict(LLMCall.objects.filter(session_id=session_id).values_list("status")
                                    .annotate(n=Count("id")).values_list("status", "n")),
            "calls_by_error": dict(LLMCall.objects.filter(session_id=session_id).exclude(error_class="")
                                   .values_list("error_class").annotate(n=Count("id")).values_list("error_class", "n")),
            "decisions_by_source": dict(BotDecision.objects.filter(participant__session_id=session_id)
                                        .values_list("source").annotate(n=Count("id")).values_list("source", "n"))}


def _text(r: dict[str, Any]) -> str:
    out = [f"$ {r['command']}", f"load average before {r['load_average_before']}, after {r.get('load_average_after')}"]
    if "aborted" in r:
        out.append(f"ABORTED: {r['aborted']}")
    for step in r.get("schedule", []):
        out.append(f"  {step['t']:7.1f} s  {step['what']}")
    for name, c in r.get("checks", {}).items():
        out.append(f"{'ok  ' if c['ok'] else 'FAIL'} {name:22} {c['value']!s:>8}   target {c['target']}")
        if c.get("detail") and (not c["ok"] or name in ("dropouts", "model_faults_logged", "phases_on_time")):
            out.append("       " + json.dumps(c["detail"], default=str)[:1500])
    if "served" in r:
        out.append(f"model requests served: {r['served']}")
        out.append(f"LLM calls: {json.dumps(r['llm_calls'])}")
        out.append(f"processes that exited on their own (restarted by the supervisor): {r['unexpected_exits'] or 0}")
    if "ok" in r:
        out.append(f"ALL TARGETS MET in {r['total_s']} s" if r["ok"] else f"TARGETS MISSED ({r['total_s']} s)")
    if "logs" in r:
        out.append(f"logs: {r['logs']}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
