"""Helpers shared by the game-core tests: small groups, driving phases without waiting, running the
automated seats' jobs at once, and a fingerprint of everything stored (to prove "nothing changed")."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import connections
from django.db.models import Max
from django.utils import timezone

from bots import automation
from experiment import services
from experiment.models import (
    Belief,
    Choice,
    Event,
    Experiment,
    Group,
    Message,
    Participant,
    QuestionnaireResponse,
    Return,
    RoundPayoff,
    Session,
)
from experiment.scheduling import runner
from tests import factories

P = Participant

# 2 human selectors, 1 human + 1 bot candidate: the smallest group that still has a bot and a choice.
SMALL = {"n_selectors": 2, "n_bot_selectors": 0, "n_candidates": 2, "n_bot_candidates": 1}


def db(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``database_sync_to_async`` that closes the connection it used before returning.

    asgiref runs the function inside a copy of the caller's context while channels closes old
    connections outside it, so a connection opened here could outlive the test and block
    pytest-django from dropping the test database.
    """
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            connections.close_all()

    return database_sync_to_async(run)


@pytest.fixture(autouse=True)
async def executor_connections_closed():
    """After a test, close what the consumers' shared worker thread left open (see :func:`db`).

    Import it into a test module to use it (autouse applies where the name is visible).
    """
    yield
    await database_sync_to_async(connections.close_all)()


def experiment_small(**fields: Any) -> Experiment:
    fields = {**SMALL, "n_rounds": 2, "belief_rounds": "last", **fields}
    return factories.experiment_create(**fields)


def group_start(experiment: Experiment | None = None, **fields: Any) -> Group:
    """A playing group, formed through the lobby from people who went through consent, instructions and quiz."""
    session = factories.session_create(experiment or experiment_small(**fields), capacity=50)
    return factories.group_start(session)


def seats(group: Group) -> dict[str, Participant]:
    return {p.seat: p for p in Participant.objects.filter(group=group)}


def people(group: Group, role: str | None = None) -> list[Participant]:
    rows = Participant.objects.filter(group=group, controller=P.Controller.PERSON).order_by("seat")
    return list(rows.filter(role=role) if role else rows)


def fresh(group: Group) -> Group:
    return Group.objects.get(pk=group.pk)


def at(group: Group) -> tuple[int, str]:
    g = fresh(group)
    return g.round_number, g.phase


def deadline_pass(group: Group) -> Group:
    """Move the current phase's deadline into the past and let the sweep close it (no waiting)."""
    Group.objects.filter(pk=group.pk).update(phase_deadline=timezone.now() - timedelta(seconds=1))
    services.sweep()
    return fresh(group)


def run_seat_jobs() -> int:
    """Run every scheduled ``seat_act`` job now, whatever its due time (the automated seats act at once).

    Other jobs (phase deadlines) are dropped: tests close phases with :func:`deadline_pass`.
    """
    jobs = runner._pop_due(float("inf"))
    ran = 0
    for name, kwargs in jobs:
        if name == "seat_act":
            automation.seat_act(**kwargs)
            ran += 1
    return ran


def bots_act(group: Group) -> None:
    """Let every automated seat that owes an action in the current phase act (as its job would)."""
    g = fresh(group)
    for p in Participant.objects.filter(group=group).exclude(controller=P.Controller.PERSON):
        automation.seat_act(participant_id=p.pk, round_number=g.round_number, phase=g.phase)


def pitch_all(group: Group, text: str = "hello") -> None:
    """Every candidate of the group writes its pitch (people directly, bots through their policy)."""
    g = fresh(group)
    for p in people(group, P.Role.CANDIDATE):
        services.pitch_submit(participant_id=p.pk, round_number=g.round_number, text=f"{text} from {p.seat}")
    bots_act(group)


def fingerprint(session: Session) -> dict[str, Any]:
    """Everything a game action could change in a session (connection bookkeeping excluded)."""
    groups = Group.objects.filter(session=session)
    return {
        "rows": {model.__name__: model.objects.filter(**{path: session}).count() for model, path in [
            (Message, "group__session"), (Choice, "group__session"), (Return, "choice__group__session"),
            (Belief, "group__session"), (RoundPayoff, "participant__session"),
            (QuestionnaireResponse, "participant__session"), (Participant, "session"), (Group, "session"),
        ]},
        "events": sorted(Event.objects.filter(session=session)
                         .exclude(type__in=["participant.connected", "participant.disconnected"])
                         .values_list("type", flat=True)),
        "groups": list(groups.order_by("pk").values_list("pk", "version", "round_number", "phase", "status")),
        "people": list(Participant.objects.filter(session=session).order_by("pk")
                       .values_list("pk", "status", "controller", "payoff", "consecutive_timeouts")),
        "max_event": Event.objects.filter(session=session)
        .exclude(type__in=["participant.connected", "participant.disconnected"]).aggregate(m=Max("id"))["m"],
    }
