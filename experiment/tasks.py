"""Celery tasks: thin, idempotent wrappers around :mod:`experiment.jobs` (production backend)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from experiment import jobs

logger = logging.getLogger(__name__)


@shared_task(acks_late=True, ignore_result=True)
def phase_close_task(*, group_id: int, round_number: int, phase: str) -> None:
    jobs.phase_close(group_id=group_id, round_number=round_number, phase=phase)


@shared_task(acks_late=True, ignore_result=True)
def seat_act_task(*, participant_id: int, round_number: int, phase: str) -> None:
    jobs.seat_act(participant_id=participant_id, round_number=round_number, phase=phase)


@shared_task(ignore_result=True)
def sweep_task() -> None:
    jobs.sweep()


# LLM turns. A run makes at most two requests (the answer and one corrective retry), each bounded by the
# profile's timeout (at most 120 s), hence the limits. Failed requests are not retried inside the task:
# the turn returns when to try again (the endpoint's Retry-After, or backoff) and the task retries itself
# then, so no worker sleeps. Database hiccups retry with exponential backoff.
LLM_TASK_OPTIONS: dict[str, Any] = {
    "bind": True, "acks_late": True, "reject_on_worker_lost": True, "ignore_result": True,
    "soft_time_limit": 270, "time_limit": 300,
    "autoretry_for": (OperationalError, InterfaceError), "retry_backoff": True, "retry_backoff_max": 30,
    "retry_jitter": True, "max_retries": 5,
}


@shared_task(**LLM_TASK_OPTIONS)
def llm_decide_task(self: Task, *, participant_id: int, round_number: int, phase: str) -> None:
    from bots import decisions

    try:
        again = decisions.decide_now(participant_id=participant_id, round_number=round_number, phase=phase)
    except SoftTimeLimitExceeded:
        # The call still counts as pending; the retry takes the turn over once its lease runs out.
        _retry(self, decisions.LEASE_MARGIN, "its time limit")
        return
    if again is not None:
        _retry(self, max(0.0, (again.at - timezone.now()).total_seconds()), again.reason)


def _retry(task: Task, countdown: float, reason: str) -> None:
    """Run the task again in ``countdown`` seconds. When the broker cannot take the retry (Redis is down), Celery would
    drop the task with a traceback; the turn instead stays as it is and the sweep hands it out again once its lease
    has run out (bots.automation.rearm), with one line in the log."""
    try:
        raise task.retry(countdown=countdown, max_retries=None)
    except Reject as exc:
        logger.warning("llm_decide %s: could not hand its retry (%s) to the broker (%s); the sweep will hand the turn "
                       "out again", task.request.kwargs, reason, exc.reason)


@shared_task(**{**LLM_TASK_OPTIONS, "bind": False, "soft_time_limit": 50, "time_limit": 60})
def llm_apply_task(*, decision_id: int) -> None:
    jobs.llm_apply(decision_id=decision_id)


TASKS = {"phase_close": phase_close_task, "seat_act": seat_act_task, "sweep": sweep_task,
         "llm_decide": llm_decide_task, "llm_apply": llm_apply_task}
