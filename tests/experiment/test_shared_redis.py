"""Two deployments on one Redis server play at the same time and never see each other's messages.

Each deployment is what docs/deployment.md describes: its own PostgreSQL database, production settings,
two uvicorn processes and a Celery worker with beat, all on the default channel prefix (nothing set by
hand). Both share one Redis server, on the same database number or on different ones: Redis Pub/Sub
ignores database numbers, and both databases count their seats and groups from 1, so without a
deployment's own prefix ``seat-1`` of one study is ``seat-1`` of the other (issue 23).

Checked: every frame a client receives belongs to its own deployment; every Pub/Sub channel published
on the server and every key left in Redis carries one deployment's prefix; each export holds exactly the
decisions its own participants made.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from django.conf import settings

from config.isolation import deployment_prefix
from tests.experiment.test_production_stack import (
    READY,
    STACK_REDIS_DB,
    WEB_START_SECONDS,
    WORKER_START_SECONDS,
    _play_whole_game,
    _production_env,
    static_root,  # noqa: F401  (a fixture: collectstatic once per module)
)
from tests.livestack import PYTHON, Processes, free_ports, run_command

pytestmark = [pytest.mark.production_stack]

ROUNDS = 2  # as _play_whole_game plays
# The same secret for both: what keeps them apart must be their database and Redis db, not luck.
SECRET = "shared-redis-" + secrets.token_urlsafe(48)

_SETUP = """
import json
from tests import factories
e = factories.experiment_create(name={name!r}, slug={slug!r}, conditions=(("disclosed", True),), n_rounds=2,
                                belief_rounds="last", pitch_seconds=8, choice_seconds=8, return_seconds=8,
                                feedback_seconds=3, belief_seconds=8)
s = factories.session_create(e, capacity=5)
print(json.dumps({{"code": s.code, "id": s.pk}}))
"""


def _server_url(database: str) -> str:
    """The test run's PostgreSQL server, with another database name."""
    parts = urlsplit(settings.TEST_DATABASE_URL)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", "", ""))


class Deployment:
    """One PartnerLab installation: its database, its Redis db number, its processes."""

    def __init__(self, name: str, *, database: str, redis_db: int, ports: list[int], procs: Processes,
                 static: Path, tmp: Path) -> None:
        self.name, self.database, self.web_ports, self.procs, self.tmp = name, database, ports, procs, tmp
        redis_parts = urlsplit(settings.TEST_REDIS_URL)
        self.redis_url = f"redis://{redis_parts.netloc or '127.0.0.1:6379'}/{redis_db}"
        self.env = _production_env(DATABASE_URL=_server_url(database), REDIS_URL=self.redis_url,
                                   DJANGO_STATIC_ROOT=str(static), DJANGO_SECRET_KEY=SECRET,
                                   PARTNERLAB_VAR_DIR=str(tmp / f"var-{name}"))
        self.prefix = deployment_prefix(database_name=database, redis_url=self.redis_url, secret_key=SECRET)
        self.session: dict[str, Any] = {}

    def manage(self, *args: str, timeout: float = 180) -> str:
        return run_command([PYTHON, "manage.py", *args], env=self.env, timeout=timeout)

    def prepare(self) -> None:
        self.manage("migrate", "--noinput", "-v0")
        # What the operator is told is what runs here, not the embedded default (issue 23), with the session id.
        told = self.manage("demo_setup", "--base-url", f"http://127.0.0.1:{self.web_ports[0]}")
        assert f"ready on postgresql database {self.database}, Redis (channel prefix {self.prefix}), scheduler celery" in told, told
        assert "embedded default" not in told and re.search(r"Demo session: +id \d+ \(manage.py export --session \d+", told), told
        out = self.manage("shell", "-c", _SETUP.format(name=f"Study {self.name}", slug=f"study-{self.name.lower()}"))
        self.session = json.loads(out.strip().splitlines()[-1])

    def start(self) -> None:
        webs = [self.procs.start(f"{self.name}-uvicorn-{port}", [
            PYTHON, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(port),
            "--lifespan", "on"], env=self.env) for port in self.web_ports]
        worker = self.procs.start(f"{self.name}-celery", [
            PYTHON, "-m", "celery", "-A", "config", "worker", "-B", "--concurrency", "2", "--loglevel", "INFO",
            "--without-mingle", "--without-gossip", "--hostname", f"shared-{self.name}@%h",
            "--schedule", str(self.tmp / f"beat-{self.name}")], env=self.env)
        for web, port in zip(webs, self.web_ports, strict=True):
            web.wait_for_http(port, timeout=WEB_START_SECONDS)
        worker.wait_for_log(READY.pattern, timeout=WORKER_START_SECONDS)

    def export(self) -> dict[str, list[dict[str, str]]]:
        out = self.tmp / f"export-{self.name}"
        self.manage("export", "--session", str(self.session["id"]), "--out", str(out), "--unzipped")
        return {table: list(csv.DictReader((out / f"{table}.csv").open(newline="")))
                for table in ("choices", "messages", "returns", "participants")}


def _drop(database: str) -> None:
    with psycopg.connect(_server_url("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(params=["same-redis-db", "different-redis-dbs"])
def deployments(request: pytest.FixtureRequest, production_services: None, static_root: Path,  # noqa: F811
                tmp_path: Path) -> Iterator[tuple[Deployment, Deployment]]:
    base = str(settings.DATABASES["default"]["NAME"])
    names = [f"{base}_shared_a", f"{base}_shared_b"]
    dbs = [STACK_REDIS_DB, STACK_REDIS_DB if request.param == "same-redis-db" else STACK_REDIS_DB + 1]
    for db in set(dbs):
        redis.Redis.from_url(f"{settings.TEST_REDIS_URL.rsplit('/', 1)[0]}/{db}").flushdb()
    procs = Processes(tmp_path)
    ports = free_ports(4)
    pair = (Deployment("A", database=names[0], redis_db=dbs[0], ports=ports[:2], procs=procs, static=static_root, tmp=tmp_path),
            Deployment("B", database=names[1], redis_db=dbs[1], ports=ports[2:], procs=procs, static=static_root, tmp=tmp_path))
    failed_before = request.session.testsfailed
    try:
        with psycopg.connect(_server_url("postgres"), autocommit=True) as conn:
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{name}"')
        yield pair
    finally:
        procs.stop_all()
        if request.session.testsfailed > failed_before:
            procs.dump()
        for name in names:
            _drop(name)


class ChannelWatch:
    """Every Pub/Sub channel published on the Redis server while it runs (PSUBSCRIBE *: all db numbers)."""

    def __init__(self, url: str) -> None:
        self.pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("*")
        self.channels: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if message and message["type"] == "pmessage":
                channel = message["channel"].decode()
                self.channels[channel] = self.channels.get(channel, 0) + 1

    def __enter__(self) -> ChannelWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()


def _owner(name: str, deployments: tuple[Deployment, ...]) -> Deployment | None:
    owners = [d for d in deployments if name.startswith(d.prefix)]
    return owners[0] if len(owners) == 1 else None


def test_two_deployments_on_one_redis_server_never_see_each_others_messages(deployments: tuple[Deployment, Deployment]) -> None:
    a, b = deployments
    assert a.prefix != b.prefix
    for d in (a, b):
        d.prepare()
    # Both databases number their sessions, groups and seats alike: the ids that used to collide.
    assert a.session["id"] == b.session["id"]
    for d in (a, b):
        d.start()

    from experiment.models import Experiment

    design = Experiment(n_rounds=ROUNDS)  # the default quiz, as both deployments have it (not saved)

    async def both() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(_play_whole_game(d, design, d.session["code"]) for d in (a, b))))

    with ChannelWatch(a.redis_url) as watch:
        played = asyncio.run(both())

    # 1. No frame of one deployment reached a client of the other. Each deployment's clients wrote pitches
    #    that name their own web ports, and its seats have their own tokens.
    markers = {}
    for d, game in zip((a, b), played, strict=True):
        markers[d.name] = [text for text in game["pitches"].values()] + [s.token for s in game["seats"]]
    for d, game, other in ((a, played[0], b), (b, played[1], a)):
        frames = [f for s in game["seats"] for f in s.frames]
        assert len(frames) > 100, len(frames)
        leaked = [f for f in frames if any(json.dumps(m)[1:-1] in f for m in markers[other.name])]
        assert not leaked, f"{len(leaked)} of {other.name}'s frames reached {d.name}'s clients, e.g. {leaked[0][:300]}"
        # ... and each client saw its own game only: the same phases in order, once each (a frame from the
        # other deployment's seat with the same id would show another place or role).
        for seat in game["seats"]:
            places = [p for p in seat.seen if p[0] == "playing"]
            assert places == [("playing", r, ph) for r in range(1, ROUNDS + 1)
                              for ph in ("pitch", "choice", "return", "feedback")] + [("playing", ROUNDS, "belief")], seat.seen

    # 2. Every channel published on the server belonged to exactly one deployment, and both used theirs.
    strays = {c: n for c, n in watch.channels.items() if _owner(c, deployments) is None}
    assert not strays, f"channels of no deployment (or of both): {strays}"
    for d in (a, b):
        mine = [c for c in watch.channels if c.startswith(d.prefix)]
        assert any(re.search(r"__group__seat-\d+$", c) for c in mine), (d.name, mine[:20])
    # 3. So did every key the deployments left in Redis (the Celery broker's queues and bindings).
    for d in (a, b):
        keys = [k.decode() for k in redis.Redis.from_url(d.redis_url).keys("*")]
        assert keys, d.name
        assert all(_owner(k, deployments) is not None for k in keys), [k for k in keys if _owner(k, deployments) is None]
    assert any(k.startswith(b.prefix) for k in (x.decode() for x in redis.Redis.from_url(b.redis_url).keys("*")))

    # 4. Each export holds exactly its own participants' decisions, nothing lost and nothing foreign.
    for d, game in zip((a, b), played, strict=True):
        tables = d.export()
        choices = tables["choices"]
        assert len(choices) == 3 * ROUNDS, choices
        assert {(c["selector_seat"], int(c["round"])): (c["candidate_seat"], int(c["sent"])) for c in choices} == game["sent"]
        human = {(m["candidate_seat"], int(m["round"])): m["text"] for m in tables["messages"] if m["candidate_kind"] == "human"}
        assert human == game["pitches"]
        assert len(tables["messages"]) == 4 * ROUNDS
        returned = {(c["selector_seat"], int(c["round"])): int(c["returned"]) for c in choices if c["candidate_kind"] == "human"}
        assert returned == game["returned"]
        people = [p for p in tables["participants"] if p["kind"] == "human"]
        assert sorted(p["prolific_pid"] for p in people) == [f"PID{i}" for i in range(5)]
        assert {p["status"] for p in people} == {"finished"}
    logs = "\n".join(p.log() for p in a.procs.procs)
    assert "Traceback" not in logs
