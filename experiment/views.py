"""Participant pages. The game itself runs over the websocket; these pages only join and serve the app."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET

from experiment import services
from experiment.game import RuleError
from experiment.models import Participant, Session

COOKIE = "partnerlab_seat_{code}"


@require_GET
def join(request: HttpRequest, code: str) -> HttpResponse:
    """Open a seat for this browser (or give back the one it already has) and go to the game page."""
    session = get_object_or_404(Session.objects.only("pk"), code=code)  # (the service reads it again, locked)
    known = request.get_signed_cookie(COOKIE.format(code=code), default=None)
    if known and Participant.objects.filter(token=known, session=session).exists():
        return redirect("play", token=known)
    try:
        p = services.participant_join(
            session_id=session.pk,
            prolific_pid=request.GET.get("PROLIFIC_PID", ""),
            study_id=request.GET.get("STUDY_ID", ""),
            recruitment_session_id=request.GET.get("SESSION_ID", ""),
        )
    except RuleError as exc:
        return render(request, "experiment/closed.html", {"message": exc.message}, status=403)
    response = redirect("play", token=p.token)
    response.set_signed_cookie(COOKIE.format(code=code), p.token, max_age=7 * 24 * 3600, httponly=True,
                               samesite="Lax", secure=request.is_secure())
    return response


@require_GET
def play(request: HttpRequest, token: str) -> HttpResponse:
    # A person whose seat a bot took over may still open the page: it shows their dropout code.
    p = get_object_or_404(Participant.objects.select_related("session__experiment")
                          .exclude(controller=Participant.Controller.SYNTHETIC),
                          token=token, kind=Participant.Kind.HUMAN)
    return render(request, "experiment/play.html", {"participant": p, "experiment": p.session.experiment})


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok", content_type="text/plain")
