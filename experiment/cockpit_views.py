"""The experimenter's cockpit: live monitor, its actions, payments and spend. Staff only."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.views.decorators.http import require_POST

from experiment import services
from experiment.game import RuleError
from experiment.models import Participant, Session, Society


@staff_member_required
def session_list(request: HttpRequest) -> HttpResponse:
    sessions = Session.objects.select_related("experiment").order_by("-created_at")[:200]
    return render(request, "cockpit/sessions.html", {"sessions": sessions})


@staff_member_required
def monitor(request: HttpRequest, session_id: int) -> HttpResponse:
    session = get_object_or_404(Session.objects.select_related("experiment"), pk=session_id)
    join_url = request.build_absolute_uri(f"/join/{session.code}/")
    ai_only = list(session.experiment.conditions.filter(society=Society.AI_ONLY).values_list("name", flat=True))
    return render(request, "cockpit/monitor.html", {"session": session, "join_url": join_url, "ai_only_conditions": ai_only,
                                                    "max_society_groups": services.MAX_SOCIETY_GROUPS})


def _act(action: Callable[[], None]) -> JsonResponse:
    try:
        action()
    except RuleError as exc:
        return JsonResponse({"ok": False, "code": exc.code, "message": exc.message}, status=409)
    return JsonResponse({"ok": True})


@staff_member_required
@require_POST
def group_action(request: HttpRequest, group_id: int, action: str) -> JsonResponse:
    actions = {"pause": services.group_pause, "resume": services.group_resume,
               "close-phase": services.group_phase_close_now}
    if action not in actions:
        return JsonResponse({"ok": False, "code": "unknown_action", "message": "Unknown action."}, status=404)
    return _act(lambda: actions[action](group_id=group_id, actor_id=request.user.pk))


@staff_member_required
@require_POST
def participant_action(request: HttpRequest, participant_id: int, action: str) -> JsonResponse:
    if action not in ("remove", "replace"):
        return JsonResponse({"ok": False, "code": "unknown_action", "message": "Unknown action."}, status=404)
    get_object_or_404(Participant, pk=participant_id)
    return _act(lambda: services.participant_remove(participant_id=participant_id, actor_id=request.user.pk,
                                                    replace_with_bot=action == "replace"))


@staff_member_required
@require_POST
def session_end(request: HttpRequest, session_id: int) -> JsonResponse:
    get_object_or_404(Session, pk=session_id)
    return _act(lambda: services.session_end(session_id=session_id, actor_id=request.user.pk))


@staff_member_required
@require_POST
def society_start(request: HttpRequest, session_id: int) -> JsonResponse:
    """Start AI-only groups in the session (form fields ``groups`` and, optionally, ``condition``)."""
    get_object_or_404(Session, pk=session_id)
    text = request.POST.get("groups", "").strip()
    if not text.isdecimal() or len(text) > 6:
        return JsonResponse({"ok": False, "code": "invalid_groups",
                             "message": f"Give a number of groups from 1 to {services.MAX_SOCIETY_GROUPS}."}, status=400)
    condition = request.POST.get("condition") or None
    try:
        ids = services.society_start(session_id=session_id, groups=int(text), condition=condition, actor_id=request.user.pk)
    except RuleError as exc:
        return JsonResponse({"ok": False, "code": exc.code, "message": exc.message}, status=409)
    return JsonResponse({"ok": True, "groups": ids})


@staff_member_required
def payments(request: HttpRequest, session_id: int) -> HttpResponse:
    session = get_object_or_404(Session.objects.select_related("experiment"), pk=session_id)
    experiment = session.experiment
    people = list(session.participants.filter(controller=Participant.Controller.PERSON)
                  .select_related("group__condition").order_by("joined_at"))
    rows = [{"p": p, "bonus": services.bonus_of(p)} for p in people]
    total = sum((r["bonus"] for r in rows), Decimal("0"))
    return render(request, "cockpit/payments.html", {
        "session": session, "experiment": experiment, "rows": rows, "total_bonus": total,
        "total_fees": experiment.participation_fee * sum(p.status == Participant.Status.FINISHED for p in people),
    })


@staff_member_required
def spend(request: HttpRequest, session_id: int) -> HttpResponse:
    session = get_object_or_404(Session.objects.select_related("experiment"), pk=session_id)
    try:
        from bots.selectors import llm_live, llm_spend
    except ImportError:  # LLM bots not installed in this build
        summary, live = None, []
    else:
        summary, live = llm_spend(session_id=session.pk), llm_live(session_id=session.pk)
    return render(request, "cockpit/spend.html", {"session": session, "summary": summary, "live": live})
