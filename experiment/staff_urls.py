"""Staff-only data URLs, included under ``staff/`` (namespace ``staff``)."""

from __future__ import annotations

from django.urls import URLPattern, path

from experiment import staff_views as views

app_name = "staff"


def _summary_routes(kind: str, prefix: str) -> list[URLPattern]:
    base = f"{prefix}/<{'int' if kind == 'session' else 'slug'}:key>/"
    return [
        path(f"{base}summary/", views.summary, {"kind": kind, "fmt": "html"}, name=f"{kind}-summary"),
        path(f"{base}summary.csv", views.summary, {"kind": kind, "fmt": "csv"}, name=f"{kind}-summary-csv"),
        path(f"{base}summary.png", views.summary, {"kind": kind, "fmt": "png"}, name=f"{kind}-summary-png"),
        path(f"{base}summary.svg", views.summary, {"kind": kind, "fmt": "svg"}, name=f"{kind}-summary-svg"),
        path(f"{base}beliefs.csv", views.summary, {"kind": kind, "fmt": "beliefs"}, name=f"{kind}-beliefs-csv"),
        path(f"{base}report/", views.summary, {"kind": kind, "fmt": "report"}, name=f"{kind}-report"),
    ]


urlpatterns = [
    path("sessions/<int:session_id>/export.zip", views.session_bundle, name="session-bundle"),
    path("experiments/<slug:slug>/export.zip", views.experiment_bundle, name="experiment-bundle"),
    path("sessions/<int:session_id>/bonus.csv", views.prolific_bonus, name="prolific-bonus"),
    *_summary_routes("session", "sessions"),
    *_summary_routes("experiment", "experiments"),
]
