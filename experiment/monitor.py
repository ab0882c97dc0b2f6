"""Reads for the experimenter's live monitor: the whole session at a glance, one group at a time.

Unlike :func:`experiment.selectors.seat_state` these views show everything (bot or human, controller,
connection), so they are for staff only.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from django.db.models import Prefetch, QuerySet
from django.utils import timezone

from experiment import game, services
from experiment.models import Group, Participant, Session

P = Participant


def seat_status(p: Participant, pending_ids: set[int], acting_role: str | None = None) -> str:
    """One word for the monitor: bot, bot-replaced, dropped, submitted, timed out, idle, waiting, offline.

    ``acting_role`` is the role that acts in the current phase: the others are "waiting", not "submitted"."""
    if p.kind == P.Kind.BOT:
        return "bot"
    if p.controller == P.Controller.SYNTHETIC:
        return "synthetic"
    if p.controller != P.Controller.PERSON:
        return "bot-replaced"
    if p.status == P.Status.DROPPED:
        return "dropped"
    if p.status != P.Status.PLAYING:
        return p.status
    if p.pk not in pending_ids:
        if p.role == acting_role:
            return "submitted"
        return "waiting" if p.connections else "offline"
    if p.consecutive_timeouts:
        return "timed out"
    return "idle" if p.connections else "offline"


def group_summary(group: Group, participants: list[Participant] | None = None) -> dict[str, Any]:
    params = group.session.experiment.params()
    seats = participants if participants is not None else list(group.participants.all())
    playing = group.status == Group.Status.PLAYING
    pending = {p.pk for p in services.pending_seats(group, params)} if playing else set()
    acting = game.actors(game.Phase(group.phase)) if playing else None
    return {
        "id": group.pk, "number": group.number, "condition": group.condition.name, "society": group.society,
        "status": group.status,
        "round": group.round_number, "rounds": params.n_rounds, "phase": group.phase if playing else "finished",
        "deadline": group.phase_deadline.isoformat() if group.phase_deadline else None,
        "paused": group.paused_at is not None, "paused_remaining": group.paused_remaining,
        "seats": [{
            "id": p.pk, "seat": p.seat, "role": p.role, "kind": p.kind, "controller": p.controller,
            "status": seat_status(p, pending, acting), "connected": p.connections > 0, "payoff": p.payoff,
            "recruitment_id": p.prolific_pid,
        } for p in sorted(seats, key=lambda s: (s.role != P.Role.SELECTOR, s.seat))],
    }


def group_summary_by_id(group_id: int) -> dict[str, Any]:
    group = Group.objects.select_related("session__experiment", "condition").get(pk=group_id)
    return group_summary(group)


def session_overview(session_id: int) -> dict[str, Any]:
    session = Session.objects.select_related("experiment").get(pk=session_id)
    groups = list(session.groups.select_related("condition", "session__experiment")
                  .prefetch_related(Prefetch("participants", queryset=Participant.objects.all())))
    by_stage = people_by_stage(session)
    return {
        "type": "monitor.state", "server_time": timezone.now().isoformat(),
        "session": session_header(session),
        "lobby": lobby_queue(session),
        "bots": bots_live(session.pk),
        "groups": [group_summary(g, list(g.participants.all())) for g in groups],
        "totals": {
            "people": sum(by_stage.values()),
            "by_status": by_stage,
            "groups_playing": sum(g.status == Group.Status.PLAYING for g in groups),
            "groups_finished": sum(g.status == Group.Status.FINISHED for g in groups),
            "points": sum(p.payoff for g in groups for p in g.participants.all() if p.kind == P.Kind.HUMAN),
        },
    }


def bots_live(session_id: int) -> list[dict[str, Any]]:
    """Per bot profile: spend against budget, calls, calls in flight, throttled waits (``bots.selectors.llm_live``).
    Empty in a build without the LLM bots."""
    try:
        from bots.selectors import llm_live
    except ImportError:
        return []
    return llm_live(session_id=session_id)


def session_header(session: Session) -> dict[str, Any]:
    return {"id": session.pk, "label": session.label or session.code, "status": session.status,
            "ended": session.ended_at is not None, "capacity": session.capacity,
            "over_recruitment": session.over_recruitment, "experiment": session.experiment.slug}


def _people(session: Session) -> QuerySet[Participant]:
    """Recruited people, including those whose seat a bot took over; not synthetic demo fillers."""
    return session.participants.filter(kind=P.Kind.HUMAN).exclude(controller=P.Controller.SYNTHETIC)


def people_by_stage(session: Session) -> dict[str, int]:
    return dict(Counter(_people(session).values_list("status", flat=True)))


def lobby_queue(session: Session) -> list[dict[str, Any]]:
    now = timezone.now()
    return [{"id": p.pk, "recruitment_id": p.prolific_pid, "waiting_seconds": round((now - p.lobby_at).total_seconds()),
             "connected": p.connections > 0}
            for p in session.participants.filter(status=P.Status.LOBBY, controller=P.Controller.PERSON).order_by("lobby_at")]
