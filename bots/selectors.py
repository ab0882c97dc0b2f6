"""Reads for the bots app: a seat's own past rounds (what its player has seen), the group's history (the
``group`` memory arm), and LLM spend."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Any

from django.db.models import Avg, Count, Q, Sum

from bots.models import BotDecision, LLMCall
from experiment.models import Choice, Message, Participant, RoundPayoff


def _window(before_round: int, rounds: int | None) -> dict[str, int]:
    """Round filters for the earlier rounds a prompt shows: all before ``before_round``, or the latest ``rounds``."""
    bounds = {"round_number__lt": before_round}
    if rounds is not None:
        bounds["round_number__gte"] = before_round - rounds
    return bounds


def candidate_history(*, participant_id: int, before_round: int, rounds: int | None = None) -> list[dict[str, Any]]:
    """A candidate's earlier rounds (the latest ``rounds`` of them, or all) as its player saw them in the return and
    feedback phases.

    Selectors need nothing extra: their per-candidate history is already in ``seat_state``.
    """
    if before_round <= 1:
        return []  # no earlier round: nothing to read
    window = _window(before_round, rounds)
    messages = dict(Message.objects.filter(candidate_id=participant_id, **window).values_list("round_number", "text"))
    points = dict(RoundPayoff.objects.filter(participant_id=participant_id, **window)
                  .values_list("round_number", "points"))
    chosen: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for c in (Choice.objects.filter(candidate_id=participant_id, **window)
              .select_related("selector", "return_decision").order_by("round_number", "selector__seat")):
        returned = getattr(c, "return_decision", None)
        chosen[c.round_number].append({"selector": c.selector.public_name, "sent": c.sent, "you_received": c.multiplied,
                                       "you_returned": returned.returned if returned else 0})
    return [{"round": r, "your_message": messages.get(r, ""), "chosen_by": chosen.get(r, []), "you_earned": points.get(r, 0)}
            for r in sorted(set(messages) | set(points) | set(chosen))]


def group_history(*, group_id: int, before_round: int, rounds: int) -> list[dict[str, Any]]:
    """The group's latest ``rounds`` earlier rounds, oldest first, for a bot whose memory arm is ``group``.

    Each round: every candidate's pitch, and every selector's choice (``chose`` is null for a selector who
    chose nobody), the points sent and the points returned (null when nothing came back to decide). Names
    are the public ones the game shows; no identity labels, so that the arm adds history, not labels.
    """
    if before_round <= 1:
        return []
    window = _window(before_round, rounds)
    by_round: dict[int, dict[str, Any]] = {}

    def entry(r: int) -> dict[str, Any]:
        return by_round.setdefault(r, {"round": r, "messages": [], "choices": []})

    for r, seat, text in (Message.objects.filter(group_id=group_id, **window)
                          .order_by("round_number", "candidate__seat").values_list("round_number", "candidate__seat", "text")):
        entry(r)["messages"].append({"candidate": Participant.name_of(Participant.Role.CANDIDATE, seat), "message": text})
    for r, selector, candidate, sent, returned in (
            Choice.objects.filter(group_id=group_id, **window).order_by("round_number", "selector__seat")
            .values_list("round_number", "selector__seat", "candidate__seat", "sent", "return_decision__returned")):
        entry(r)["choices"].append({"selector": Participant.name_of(Participant.Role.SELECTOR, selector),
                                    "chose": Participant.name_of(Participant.Role.CANDIDATE, candidate) if candidate else None,
                                    "sent": sent, "returned": returned})
    return [by_round[r] for r in sorted(by_round)]


def llm_spend(*, session_id: int) -> dict[str, Any]:
    """Tokens, cost, errors and latency of a session's LLM calls, per bot profile and in total.

    Shape: ``{"profiles": [row, …], "total": row | None}``; a row has ``profile``, ``model``, ``calls``,
    ``tokens_in``, ``tokens_out``, ``cost`` (Decimal, USD), ``errors``, ``error_rate`` (0..1),
    ``mean_latency_ms``, and ``decisions`` by source (``llm`` / ``scripted`` fallback / ``defaulted``).
    """
    calls = LLMCall.objects.filter(session_id=session_id)
    failed = Q(status__in=[LLMCall.Status.ERROR, LLMCall.Status.INVALID])
    aggregates = {"calls": Count("id"), "tokens_in": Sum("tokens_in"), "tokens_out": Sum("tokens_out"), "cost": Sum("cost"),
                  "errors": Count("id", filter=failed), "mean_latency_ms": Avg("latency_ms")}

    def row(values: dict[str, Any]) -> dict[str, Any]:
        n = values["calls"] or 0
        return {"calls": n, "tokens_in": values["tokens_in"] or 0, "tokens_out": values["tokens_out"] or 0,
                "cost": (values["cost"] or Decimal("0")).quantize(Decimal("0.000001")), "errors": values["errors"] or 0,
                "error_rate": round((values["errors"] or 0) / n, 3) if n else 0.0,
                "mean_latency_ms": round(values["mean_latency_ms"]) if values["mean_latency_ms"] is not None else None}

    profiles = [{"profile": v.pop("profile__name") or "(deleted profile)", "model": v.pop("model"), **row(v)}
                for v in calls.values("profile__name", "model").annotate(**aggregates).order_by("profile__name", "model")]
    total = row(calls.aggregate(**aggregates)) if profiles else None
    decisions = dict(BotDecision.objects.filter(session_id=session_id).values_list("source").annotate(n=Count("id")))
    defaulted = BotDecision.objects.filter(session_id=session_id, status=BotDecision.Status.DEFAULTED).count()
    seats = dict(Participant.objects.filter(session_id=session_id).exclude(controller=Participant.Controller.PERSON)
                 .values_list("controller").annotate(n=Count("id")))
    return {"profiles": profiles, "total": total,
            "decisions": {"llm": decisions.get("llm", 0), "scripted": decisions.get("scripted", 0), "defaulted": defaulted},
            "automated_seats": seats}


def llm_live(*, session_id: int) -> list[dict[str, Any]]:
    """What the cockpit shows live per bot profile playing in the session: spend so far against the session
    budget, calls made, calls in flight (sent, no reply yet), throttled waits (turns that had to wait for the
    profile's limits) and turns the budget stopped. Profiles of the experiment's arms show before their first call.

    Amounts are strings (US dollars, exact) so that the JSON the monitor receives keeps every digit."""
    from bots.models import BotProfile
    from experiment.models import Condition

    calls = {v.pop("profile_id"): v for v in LLMCall.objects.filter(session_id=session_id).values("profile_id").annotate(
        calls=Count("id"), cost=Sum("cost"), in_flight=Count("id", filter=Q(status=LLMCall.Status.PENDING)))}
    turns = {v.pop("profile_id"): v for v in BotDecision.objects.filter(session_id=session_id).values("profile_id").annotate(
        throttled=Sum("throttled"), budget_stops=Count("id", filter=Q(outcome__budget=True)))}
    armed = set(Condition.objects.filter(experiment__sessions=session_id, bot_profile__isnull=False)
                .values_list("bot_profile_id", flat=True))
    ids = (set(calls) | set(turns) | armed) - {None}
    rows = []
    for profile in BotProfile.objects.filter(pk__in=ids).order_by("name"):
        c, t = calls.get(profile.pk, {}), turns.get(profile.pk, {})
        cost = (c.get("cost") or Decimal("0")).quantize(Decimal("0.000001"))
        budget = profile.budget_per_session_usd
        rows.append({
            "profile_id": profile.pk, "profile": profile.name, "model": profile.model,
            "calls": c.get("calls", 0), "in_flight": c.get("in_flight", 0), "cost": str(cost),
            "budget": str(budget) if budget is not None else None,
            "budget_used": round(float(cost / budget), 4) if budget else None,
            "throttled": t.get("throttled") or 0, "budget_stops": t.get("budget_stops", 0),
            "max_concurrent": profile.max_concurrent, "requests_per_minute": profile.requests_per_minute,
        })
    return rows
