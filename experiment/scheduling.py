"""Timed work (phase deadlines, automated seats) with one interface and two backends.

- ``celery`` (production): each job is a Celery task with an ``eta``; Celery beat runs the sweep.
- ``inprocess`` (embedded default): :class:`InProcessRunner`, an asyncio loop inside the ASGI
  process that runs jobs in worker threads and sweeps every ``PARTNERLAB_SWEEP_SECONDS``.

The game code calls :func:`schedule` only; it never knows which backend runs the job. Jobs are
idempotent (they re-read state and return early when their work is done or obsolete), so a job run
twice, late, or not at all (the sweep closes overdue phases) never corrupts a game.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import kombu.exceptions
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, transaction
from django.utils import timezone
from redis.exceptions import ConnectionError as RedisConnectionError

from experiment.perprocess import PerProcess

logger = logging.getLogger(__name__)


def schedule(job: str, *, at: datetime | None = None, **kwargs: Any) -> None:
    """Run ``job`` (a name in :data:`experiment.jobs.JOBS`) at ``at`` once the transaction commits."""
    transaction.on_commit(lambda: submit(job, at=at, **kwargs))


def submit(job: str, *, at: datetime | None = None, **kwargs: Any) -> None:
    if settings.PARTNERLAB_SCHEDULER == "celery":
        from experiment.events import server_loop

        if server_loop() is not None:
            # In a web process the caller is a participant's request, holding one of a few database threads:
            # hand the publish to this process's publisher thread (one, so jobs leave in order) instead of a
            # broker round trip here. Queued publishes still go out when the process exits.
            _publisher.get().submit(_publish, job, at, kwargs).add_done_callback(_report_failure)
        else:
            _publish(job, at, kwargs)
    else:
        runner.submit(job, at, kwargs)


def _publish(job: str, at: datetime | None, kwargs: dict[str, Any]) -> None:
    from experiment import tasks

    tasks.TASKS[job].apply_async(kwargs=kwargs, eta=at)


def _report_failure(future: concurrent.futures.Future[None]) -> None:
    if future.cancelled() or (exc := future.exception()) is None:
        return
    # The sweep still closes the phase at its deadline. A broker that is down is said in one line.
    if isinstance(exc, (OSError, kombu.exceptions.OperationalError, RedisConnectionError)):
        logger.warning("could not hand a job to the broker (%s); the sweep closes the phase at its deadline", exc)
    else:
        logger.error("could not hand a job to the broker", exc_info=exc)


_publisher = PerProcess(lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="partnerlab-publish"))


def _job(name: str) -> Callable[..., Any]:
    from experiment.jobs import JOBS

    return JOBS[name]


def run_job(name: str, kwargs: dict[str, Any]) -> None:
    """Run one job in this thread with fresh database connections, logging (not raising) failures."""
    close_old_connections()
    try:
        _job(name)(**kwargs)
    except Exception:
        logger.exception("job %s(%s) failed", name, kwargs)
    finally:
        close_old_connections()


class InProcessRunner:
    """A timer heap drained by an asyncio task; jobs run in threads so the event loop never blocks."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._sweeping = False

    def submit(self, job: str, at: datetime | None, kwargs: dict[str, Any]) -> None:
        due = time.time() if at is None else at.timestamp()
        with self._lock:
            heapq.heappush(self._heap, (due, next(self._counter), job, kwargs))
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    def pending(self) -> int:
        with self._lock:
            return len(self._heap)

    def clear(self) -> None:
        with self._lock:
            self._heap.clear()

    def _pop_due(self, now: float) -> list[tuple[str, dict[str, Any]]]:
        due = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                _, _, job, kwargs = heapq.heappop(self._heap)
                due.append((job, kwargs))
        return due

    def run_due_now(self) -> int:
        """Run every due job in the calling thread (tests without a running loop). Returns how many ran."""
        ran = 0
        while batch := self._pop_due(time.time()):
            for job, kwargs in batch:
                run_job(job, kwargs)
                ran += 1
        return ran

    async def run(self, *, sweep_every: float | None = None) -> None:
        """Drain the heap forever (cancel the task to stop). Sweeps overdue phases every ``sweep_every`` s."""
        sweep_every = settings.PARTNERLAB_SWEEP_SECONDS if sweep_every is None else sweep_every
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()
        next_sweep = time.time()
        try:
            while True:
                now = time.time()
                for job, kwargs in self._pop_due(now):
                    task = asyncio.create_task(self._execute(job, kwargs))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if sweep_every > 0 and now >= next_sweep:
                    next_sweep = now + sweep_every
                    if not self._sweeping:
                        task = asyncio.create_task(self._sweep())
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                with self._lock:
                    next_due = self._heap[0][0] if self._heap else now + 3600
                wait = max(0.0, min(next_due, next_sweep if sweep_every > 0 else next_due) - time.time())
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
        finally:
            for task in tasks:
                task.cancel()
            self._loop = None
            self._wake = None

    async def _execute(self, job: str, kwargs: dict[str, Any]) -> None:
        await sync_to_async(run_job, thread_sensitive=False)(job, kwargs)

    async def _sweep(self) -> None:
        self._sweeping = True
        try:
            await sync_to_async(run_job, thread_sensitive=False)("sweep", {})
        finally:
            self._sweeping = False


runner = InProcessRunner()


def now() -> datetime:
    return timezone.now()
