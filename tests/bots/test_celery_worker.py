"""LLM turns in real Celery worker processes (PostgreSQL + Redis): a worker killed in the middle of a model
call, its task redelivered to a new worker, exactly one decision; a 429 whose Retry-After spaces the
task's own retry; a retry the broker cannot take (Redis down), which leaves the turn to the sweep; and a worker that
loses Redis in the middle of a task and stays up (config/broker.py)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import redis
from django.conf import settings
from django.db import connection
from django.utils import timezone

from bots.fake_openai import FakeOpenAI, Reply
from bots.models import BotDecision, BotProfile, LLMCall
from config.celery import app
from experiment import tasks
from experiment.models import Message, Participant
from experiment.scheduling import runner
from tests.bots.conftest import KEY, KEY_ENV, group_with, profile_create, seat_of
from tests.livestack import PYTHON, Proc, Processes, clean_env, free_ports

pytestmark = [pytest.mark.production_stack, pytest.mark.django_db(transaction=True)]
REDIS_DB = 11  # a Redis database of its own (other stack tests use others), flushed per test
WORKER_START_SECONDS = 60


def _database_url() -> str:
    s = connection.settings_dict
    auth = quote(s.get("USER") or "", safe="")
    if s.get("PASSWORD"):
        auth += ":" + quote(s["PASSWORD"], safe="")
    return f"postgres://{auth}@{s.get('HOST') or '127.0.0.1'}:{s.get('PORT') or 5432}/{quote(s['NAME'], safe='')}"


@pytest.fixture
def broker(production_services: None) -> str:
    url = f"redis://{urlsplit(settings.TEST_REDIS_URL).netloc or '127.0.0.1:6379'}/{REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    started = Processes(tmp_path)
    failed_before = request.session.testsfailed
    try:
        yield started
    finally:
        started.stop_all()  # before pytest-django empties the database: no worker may still write to it
        if request.session.testsfailed > failed_before:
            started.dump()


@pytest.fixture
def workers(broker: str, transactional_db: None, procs: Processes) -> Callable[..., Proc]:
    """Starts Celery workers on the test's broker (or on ``broker=`` another one)."""
    count = iter(range(1, 100))
    secret = secrets.token_urlsafe(48)

    def start(*, on: str = broker) -> Proc:
        n = next(count)
        env = clean_env(DJANGO_SETTINGS_MODULE="tests.bots.worker_settings", DJANGO_SECRET_KEY=secret,
                        DJANGO_ALLOWED_HOSTS="127.0.0.1", DATABASE_URL=_database_url(), REDIS_URL=on, **{KEY_ENV: KEY})
        # As docs/deployment.md starts them: without mingle and gossip (gossip's own clean-up after a lost broker
        # logs an AttributeError of Celery's, harmless, that production never runs into).
        worker = procs.start(f"llm-worker-{n}", [PYTHON, "-m", "celery", "-A", "config", "worker", "--concurrency", "2",
                                                  "--loglevel", "INFO", "--without-mingle", "--without-gossip",
                                                  "--hostname", f"llmbots{n}@%h"], env=env)
        worker.wait_for_log(r"@\S+ ready\.", timeout=WORKER_START_SECONDS)
        return worker

    return start


def _enqueue(broker: str, bot: Participant, phase: str = "pitch") -> None:
    """What a phase opening does in production: publish the turn's task (here, to the test's broker)."""
    runner.clear()  # the test process runs the embedded scheduler: drop its copies of the jobs
    with app.connection_for_write(broker) as conn:
        tasks.llm_decide_task.apply_async(kwargs={"participant_id": bot.pk, "round_number": 1, "phase": phase},
                                          connection=conn)


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_worker_killed_mid_call_is_replaced_and_the_turn_decides_once(fake: FakeOpenAI, broker: str,
                                                                        workers: Callable[..., Proc]) -> None:
    profile: BotProfile = profile_create(fake.base_url, timeout_seconds=6.0)
    group = group_with(profile)
    bot = seat_of(group, kind="bot")
    fake.script(Reply.json({"message": "never delivered"}, latency=60))  # the call the killed worker is waiting on
    first = workers()
    _enqueue(broker, bot)
    _wait(lambda: fake.in_flight == 1, 30, "the first worker's model call")
    _wait(lambda: LLMCall.objects.filter(participant=bot, status="pending").exists(), 10, "the pending call row")
    first.kill()  # SIGKILL, mid-call: nothing gets to clean up or acknowledge
    assert BotDecision.objects.get(participant=bot).status == BotDecision.Status.DECIDING

    second = workers()
    # The broker redelivers the unacknowledged task; the new worker waits out the dead worker's lease, takes
    # the turn over, asks the model again and releases one decision.
    _wait(lambda: Message.objects.filter(candidate=bot).exists(), 60, "the bot's pitch")
    time.sleep(1.0)  # room for any duplicate to show up
    assert Message.objects.filter(candidate=bot).count() == 1
    decision = BotDecision.objects.get(participant=bot)
    assert (decision.status, decision.source) == (BotDecision.Status.APPLIED, BotDecision.Source.LLM)
    lost, ok = LLMCall.objects.filter(participant=bot).order_by("id")
    assert (lost.status, lost.error_class, lost.applied) == ("error", "WorkerLost", False)
    assert (ok.status, ok.attempt, ok.applied) == ("ok", 2, True)
    assert len(fake.requests) == 2
    assert Message.objects.get(candidate=bot).text == ok.parsed[0]["text"]
    log = second.log()
    assert "llm_decide_task" in log and "retry" in log.lower()  # the redelivered copy backed off, then took over


def test_a_rate_limited_turn_retries_after_retry_after_in_the_worker(fake: FakeOpenAI, broker: str,
                                                                     workers: Callable[..., Proc]) -> None:
    profile = profile_create(fake.base_url)
    group = group_with(profile)
    bot = seat_of(group, kind="bot")
    fake.script(Reply.error(429, retry_after=2))
    workers()
    _enqueue(broker, bot)
    _wait(lambda: Message.objects.filter(candidate=bot).exists(), 60, "the bot's pitch")
    failed, ok = LLMCall.objects.filter(participant=bot).order_by("id")
    assert (failed.status, failed.http_status) == ("error", 429) and ok.status == "ok" and ok.applied
    assert (ok.created_at - failed.finished_at).total_seconds() >= 1.9  # the task's retry waited for Retry-After
    assert Message.objects.filter(candidate=bot).count() == 1


def _redis_server(procs: Processes, port: int) -> Proc:
    """A Redis server of the test's own, which it may kill: the shared one serves every other test."""
    server = procs.start(f"redis-{port}-{len(procs.procs)}", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                                             "--save", "", "--appendonly", "no"], env=clean_env())
    server.wait_for_log(r"Ready to accept connections", timeout=20)
    return server


def test_a_retry_the_broker_cannot_take_leaves_the_turn_to_the_sweep(fake: FakeOpenAI, production_services: None,
                                                                      procs: Processes, workers: Callable[..., Proc]) -> None:
    from bots import automation

    port = free_ports(1)[0]
    own = f"redis://127.0.0.1:{port}/0"
    server = _redis_server(procs, port)
    profile = profile_create(fake.base_url)
    group = group_with(profile)
    bot = seat_of(group, kind="bot")
    fake.script(Reply.error(429, retry_after=2, latency=3))  # the answer comes once Redis is gone
    worker = workers(on=own)
    _enqueue(own, bot)
    _wait(lambda: fake.in_flight == 1, 30, "the worker's model call")
    server.kill()
    _wait(lambda: LLMCall.objects.filter(participant=bot, http_status=429).exists(), 30, "the 429 recorded")
    # Celery's own retry cannot be published: it would drop the task with a traceback ("Reject"). The task's process
    # writes one line instead.
    _wait(lambda: "could not hand its retry (RateLimitError) to the broker" in worker.log(), 60, "the warning line")
    assert "Reject" not in worker.log()
    decision = BotDecision.objects.get(participant=bot)
    assert decision.status == BotDecision.Status.DECIDING and len(fake.requests) == 1

    server = _redis_server(procs, port)  # Redis is back, empty: the retry is nowhere
    worker.kill()  # a restart, as after a crash: the new worker starts on the new Redis
    workers(on=own)
    runner.clear()
    # Once the lease of the retry that never came is past the re-arm limit, the sweep hands the turn out again.
    past = timezone.now() - timedelta(seconds=settings.PARTNERLAB_REARM_AFTER_SECONDS + 1)
    BotDecision.objects.filter(pk=decision.pk).update(lease_until=past)
    type(group).objects.filter(pk=group.pk).update(phase_started_at=past)
    assert automation.rearm(timezone.now(), force=True) == 1
    assert [kw for _, _, job, kw in runner._heap if job == "llm_decide"] == [
        {"participant_id": bot.pk, "round_number": 1, "phase": "pitch"}]
    runner.clear()
    _enqueue(own, bot)  # what the sweep's job does in production
    _wait(lambda: Message.objects.filter(candidate=bot).exists(), 60, "the bot's pitch")
    decision.refresh_from_db()
    assert (decision.status, decision.source) == (BotDecision.Status.APPLIED, BotDecision.Source.LLM)
    assert [c.http_status for c in LLMCall.objects.filter(participant=bot).order_by("id")] == [429, None]



def test_a_worker_that_loses_redis_mid_task_survives_and_consumes_again(fake: FakeOpenAI, production_services: None,
                                                                         procs: Processes,
                                                                         workers: Callable[..., Proc]) -> None:
    # kombu 5.7's Redis transport made the worker's main process exit here: closing the lost connection, it put
    # back the running (acks_late) task's message with a connection pool it could no longer build ("Unrecoverable
    # error: AttributeError … 'hostname'"). config/broker.py guards it; the worker must stay up, quietly.
    port = free_ports(1)[0]
    own = f"redis://127.0.0.1:{port}/0"
    server = _redis_server(procs, port)
    profile = profile_create(fake.base_url, timeout_seconds=15.0)
    group = group_with(profile)
    bot = seat_of(group, kind="bot")
    fake.script(Reply(content=None, latency=6))  # a valid pitch, answered once Redis is back
    worker = workers(on=own)
    _enqueue(own, bot)
    _wait(lambda: fake.in_flight == 1, 30, "the worker's model call")
    server.kill()
    lost = worker.wait_for_log(r"Connection to broker lost", timeout=20).end()
    time.sleep(1.0)  # the consumer closes the lost connection (where it used to exit) and retries
    assert worker.running, worker.tail()
    _redis_server(procs, port)  # Redis is back, empty
    worker.wait_for_log(r"Connected to \S+://", timeout=30, after=lost)
    # The task ends on the new Redis: its acknowledgement and its release job (llm_apply) go through, and the
    # worker consumes that job, which stores the pitch.
    _wait(lambda: Message.objects.filter(candidate=bot).exists(), 60, "the bot's pitch")
    time.sleep(1.0)
    assert Message.objects.filter(candidate=bot).count() == 1
    decision = BotDecision.objects.get(participant=bot)
    assert (decision.status, decision.source) == (BotDecision.Status.APPLIED, BotDecision.Source.LLM)
    assert worker.running
    log = worker.log()
    assert "Restoring 1 unacknowledged message(s)" in log  # the path that used to crash was taken
    assert "CRITICAL" not in log and "Traceback" not in log and "Unrecoverable" not in log, worker.tail()
