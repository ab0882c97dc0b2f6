"""Celery tasks: thin, idempotent wrappers around :mod:`experiment.jobs` (production backend)."""

from __future__ import annotations

from celery import shared_task

from experiment import jobs


@shared_task(acks_late=True, ignore_result=True)
def phase_close_task(*, group_id: int, round_number: int, phase: str) -> None:
    jobs.phase_close(group_id=group_id, round_number=round_number, phase=phase)


@shared_task(acks_late=True, ignore_result=True)
def seat_act_task(*, participant_id: int, round_number: int, phase: str) -> None:
    jobs.seat_act(participant_id=participant_id, round_number=round_number, phase=phase)


@shared_task(ignore_result=True)
def sweep_task() -> None:
    jobs.sweep()


TASKS = {"phase_close": phase_close_task, "seat_act": seat_act_task, "sweep": sweep_task}
