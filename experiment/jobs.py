"""The jobs the scheduler runs. Each takes ids, re-reads state and does nothing when obsolete."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.utils import timezone

from experiment import services


def phase_close(*, group_id: int, round_number: int, phase: str) -> None:
    services.phase_close(group_id=group_id, round_number=round_number, phase=phase, reason="deadline")


def seat_act(*, participant_id: int, round_number: int, phase: str) -> None:
    from bots import automation

    automation.seat_act(participant_id=participant_id, round_number=round_number, phase=phase)


def sweep() -> None:
    from bots import automation

    services.sweep()
    automation.rearm(timezone.now())


def llm_decide(*, participant_id: int, round_number: int, phase: str) -> None:
    """Embedded default: the turn waits for its model on the bots' event loop, not in a scheduler thread.
    (Celery runs ``bots.decisions.decide_now`` in the worker instead; see ``tasks.llm_decide_task``.)"""
    from bots import decisions

    decisions.decide_in_background(participant_id=participant_id, round_number=round_number, phase=phase)


def llm_apply(*, decision_id: int) -> None:
    from bots import decisions

    decisions.apply(decision_id=decision_id)


JOBS: dict[str, Callable[..., Any]] = {"phase_close": phase_close, "seat_act": seat_act, "sweep": sweep,
                                       "llm_decide": llm_decide, "llm_apply": llm_apply}
