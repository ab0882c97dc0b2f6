"""Staff-only data pages: bundle downloads, the preference-shift summary, the report, the Prolific bonus file.

The plain functions at the top are what admin actions call: they take ids (a queryset's
``values_list("pk", flat=True)``) and return a response, e.g.
``sessions_bundle_response(session_ids=queryset.values_list("pk", flat=True), request=request)``,
:func:`experiments_bundle_response`, :func:`prolific_bonus_response`; the summary of a session is at
``reverse("staff:session-summary", args=[session.pk])`` (``experiment-summary`` with a slug).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any
from urllib.parse import urlencode

from asgiref.sync import sync_to_async
from django.contrib.admin.views.decorators import staff_member_required
from django.core.handlers.asgi import ASGIRequest
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest, StreamingHttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.views.decorators.http import require_GET

from experiment import export
from experiment.export import ExportError, Options, Scope
from experiment.models import Experiment, Session

# ---- for admin actions and other callers ----------------------------------------------------------------


def scope_for_sessions(session_ids: Iterable[int]) -> Scope:
    return Scope.for_sessions(session_ids)


def scope_for_experiments(experiment_ids: Iterable[int]) -> Scope:
    return Scope.for_experiments(experiment_ids)


async def _aiterate(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Serve a sync chunk generator to an ASGI server one chunk at a time.

    Every step runs in the request's thread-sensitive executor, the thread that owns the database
    connection (and the server-side cursor the generator holds). Django would otherwise read a sync
    iterator to the end into memory before sending anything.
    """
    step = sync_to_async(next, thread_sensitive=True)
    sentinel = object()
    try:
        while (chunk := await step(chunks, sentinel)) is not sentinel:
            yield chunk
    finally:
        # Also on a client that went away: the generator closes its cursor and transaction.
        await sync_to_async(chunks.close, thread_sensitive=True)()


def bundle_response(*, scope: Scope, options: Options, request: HttpRequest | None = None) -> StreamingHttpResponse:
    """A streaming zip download of the bundle for ``scope``. Use from views and admin actions."""
    chunks = export.bundle_stream(scope=scope, options=options)
    content: Any = _aiterate(chunks) if isinstance(request, ASGIRequest) else chunks
    response = StreamingHttpResponse(content, content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="{export.bundle_name(scope, options)}"'
    response["Cache-Control"] = "no-store"
    return response


def sessions_bundle_response(*, session_ids: Iterable[int], request: HttpRequest, pseudonymise: bool = False,
                             fmt: str = "csv") -> StreamingHttpResponse:
    """For an admin action on sessions: the bundle of the selected sessions (staff: recruitment ids included)."""
    options = Options(format=fmt, recruitment="pseudonymise" if pseudonymise else "include")  # type: ignore[arg-type]
    return bundle_response(scope=scope_for_sessions(session_ids), options=options, request=request)


def experiments_bundle_response(*, experiment_ids: Iterable[int], request: HttpRequest, pseudonymise: bool = False,
                                fmt: str = "csv") -> StreamingHttpResponse:
    """For an admin action on experiments: the bundle of every session of the selected experiments."""
    options = Options(format=fmt, recruitment="pseudonymise" if pseudonymise else "include")  # type: ignore[arg-type]
    return bundle_response(scope=scope_for_experiments(experiment_ids), options=options, request=request)


def prolific_bonus_response(*, session_id: int) -> HttpResponse:
    """The Prolific bulk-bonus file of one session as a download (``PROLIFIC_PID,amount`` lines)."""
    return _download(export.prolific_bonus_csv(session_id=session_id), "text/csv; charset=utf-8",
                     f"prolific-bonus-session-{session_id}.csv")


def options_from(request: HttpRequest) -> Options:
    """Export options from query parameters. Staff see recruitment ids unless they ask for pseudonyms or none."""
    recruitment = request.GET.get("recruitment", "include")
    if request.GET.get("pseudonymise") in ("1", "true", "yes"):
        recruitment = "pseudonymise"
    return Options(format=request.GET.get("format", "csv"), recruitment=recruitment)  # type: ignore[arg-type]


# ---- bundle downloads -----------------------------------------------------------------------------------

def _scope(kind: str, key: str | int) -> tuple[Scope, str]:
    if kind == "session":
        session = get_object_or_404(Session.objects.select_related("experiment"), pk=key)
        return Scope.session(session.pk), f"{session.experiment.name} · session {session.label or session.code}"
    experiment = get_object_or_404(Experiment, slug=key)
    return Scope.experiment(experiment.slug), f"{experiment.name} · all sessions"


@staff_member_required
@require_GET
def session_bundle(request: HttpRequest, session_id: int) -> HttpResponse:
    return _bundle(request, "session", session_id)


@staff_member_required
@require_GET
def experiment_bundle(request: HttpRequest, slug: str) -> HttpResponse:
    return _bundle(request, "experiment", slug)


def _bundle(request: HttpRequest, kind: str, key: str | int) -> HttpResponse:
    scope, _ = _scope(kind, key)
    try:
        options = options_from(request)
    except ExportError as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain")
    return bundle_response(scope=scope, options=options, request=request)


# ---- the preference-shift summary -------------------------------------------------------------------------

def _include_timeouts(request: HttpRequest) -> bool:
    return request.GET.get("include_timeouts") in ("1", "true", "yes")


SUMMARY_FORMATS = {"html": "summary", "csv": "summary-csv", "beliefs": "beliefs-csv", "png": "summary-png",
                   "svg": "summary-svg", "report": "report"}


@staff_member_required
@require_GET
def summary(request: HttpRequest, kind: str, key: str | int, fmt: str = "html") -> HttpResponse:
    """The summary page, or the same numbers as CSV, the plot as PNG / SVG, the full report (HTML)."""
    from experiment import analysis

    scope, title = _scope(kind, key)
    include = _include_timeouts(request)
    # The unit and method of inference, as `analyze --cluster/--inference` take them (docs/analysis.md).
    cluster, inference = request.GET.get("cluster", "group"), request.GET.get("inference", "auto")
    try:
        analysis.check_inference(cluster=cluster, inference=inference)
    except ValueError as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain; charset=utf-8")
    if fmt == "beliefs":
        return _download(analysis.rows_csv(analysis.belief_rows(scope=scope, cluster=cluster), analysis.BELIEF_COLUMNS),
                         "text/csv; charset=utf-8", f"beliefs-{scope.label}.csv")
    if fmt == "report":
        return HttpResponse(analysis.report_html(scope=scope, title=title, include_timeouts=include, cluster=cluster,
                                                 inference=inference))
    rows = analysis.summary_rows(scope=scope, include_timeouts=include, cluster=cluster)
    if fmt == "csv":
        return _download(analysis.rows_csv(rows, analysis.SUMMARY_COLUMNS), "text/csv; charset=utf-8",
                         f"preference-shift-{scope.label}.csv")
    if fmt in ("png", "svg"):
        image = analysis.plot(rows, fmt=fmt, chance=analysis.bot_share_of_candidates(scope=scope))
        return HttpResponse(image, content_type="image/png" if fmt == "png" else "image/svg+xml")
    if fmt != "html":
        raise Http404("Unknown summary format.")
    def query(**changes: Any) -> str:
        values = {"include_timeouts": "1" if include else "", "cluster": "" if cluster == "group" else cluster,
                  "inference": "" if inference == "auto" else inference, **changes}
        kept = {k: v for k, v in values.items() if v}
        return "?" + urlencode(kept) if kept else ""

    links = {name: reverse(f"staff:{kind}-{route}", args=[key]) + query() for name, route in SUMMARY_FORMATS.items()}
    links["bundle"] = reverse(f"staff:{kind}-bundle", args=[key])
    base = links["html"].split("?")[0]
    links["toggle"] = base + query(include_timeouts="" if include else "1")
    links["clusters"] = {c: base + query(cluster="" if c == "group" else c) for c in analysis.CLUSTERS}
    return render(request, "experiment/staff/summary.html", {
        "title": title, "scope": scope, "kind": kind, "key": key, "include_timeouts": include, "cluster": cluster,
        "columns": analysis.SUMMARY_COLUMNS, "rows": rows, "belief_columns": analysis.BELIEF_COLUMNS,
        "beliefs": analysis.belief_rows(scope=scope, cluster=cluster), "links": links,
    })


def _download(text: str, content_type: str, filename: str) -> HttpResponse:
    response = HttpResponse(text, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# ---- Prolific ---------------------------------------------------------------------------------------------

@staff_member_required
@require_GET
def prolific_bonus(request: HttpRequest, session_id: int) -> HttpResponse:
    session = get_object_or_404(Session, pk=session_id)
    return prolific_bonus_response(session_id=session.pk)
