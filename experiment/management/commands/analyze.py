"""The preference-shift report: ``manage.py analyze (--session ID | --experiment SLUG) --out DIR``."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from experiment.export import ExportError, Scope
from experiment.models import Experiment, Session


class Command(BaseCommand):
    help = ("Write report.html (self-contained: summary, plots, belief accuracy, logistic regression with its reading) "
            "plus the summary and regression as CSV and the plots as PNG and SVG into DIR.")

    def add_arguments(self, parser: CommandParser) -> None:
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--session", type=int, help="Session id.")
        which.add_argument("--experiment", help="Experiment slug (all its sessions).")
        parser.add_argument("--out", required=True, type=Path, help="Directory to write into (created if missing).")
        parser.add_argument("--include-timeouts", action="store_true",
                            help="Count choices applied by default at a deadline (left out by default).")
        parser.add_argument("--cluster", default="group",
                            help="Unit of inference: group (default; the mini-society, the independent unit), session, "
                                 "or selector (a sensitivity check). Clusters the regression and the summary's intervals.")
        parser.add_argument("--inference", default="auto",
                            help="auto (default: CR2 errors with Bell-McCaffrey degrees of freedom with fewer than 50 "
                                 "clusters, CR1 errors with t(G-1) otherwise), cr2, bootstrap (the wild cluster score "
                                 "bootstrap), or crve. See docs/analysis.md.")

    def handle(self, *args, **o) -> None:
        from experiment import analysis

        try:
            analysis.check_inference(cluster=o["cluster"], inference=o["inference"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        try:
            if o["session"] is not None:
                scope = Scope.session(o["session"])
                session = Session.objects.select_related("experiment").get(pk=o["session"])
                title = f"{session.experiment.name} · session {session.label or session.code}"
            else:
                scope = Scope.experiment(o["experiment"])
                title = f"{Experiment.objects.get(slug=o['experiment']).name} · all sessions"
        except ExportError as exc:
            raise CommandError(str(exc)) from None
        out: Path = o["out"]
        if out.exists() and not out.is_dir():
            raise CommandError(f"--out {out} exists and is not a directory.")
        out.mkdir(parents=True, exist_ok=True)
        include = o["include_timeouts"]
        context = analysis.report_context(scope=scope, title=title, include_timeouts=include, cluster=o["cluster"],
                                          inference=o["inference"])
        summary = context["raw"]["summary"]
        chance = analysis.bot_share_of_candidates(scope=scope)
        from django.template.loader import render_to_string

        files = {
            "report.html": render_to_string("experiment/staff/report.html", context).encode(),
            "summary.csv": analysis.rows_csv(summary, analysis.SUMMARY_COLUMNS).encode(),
            "beliefs.csv": analysis.rows_csv(context["raw"]["beliefs"], analysis.BELIEF_COLUMNS).encode(),
            "share_to_bots.png": analysis.plot(summary, fmt="png", chance=chance),
            "share_to_bots.svg": analysis.plot(summary, fmt="svg", chance=chance),
            "return_ratio.png": analysis.plot_returns(summary, fmt="png"),
            "return_ratio.svg": analysis.plot_returns(summary, fmt="svg"),
        }
        fit = context["regression"]
        if not fit.error:
            files["regression.csv"] = fit.coefficients_csv().encode()
            files["regression.txt"] = (fit.formula + "\n\n" + "\n\n".join(fit.reading) + "\n\n"
                                       "statsmodels output (its SEs, z and intervals are CR1 with the normal "
                                       "reference; the p-values and intervals above are the declared method's):\n\n"
                                       + fit.text + "\n").encode()
        for name, data in files.items():
            (out / name).write_bytes(data)
            self.stdout.write(f"  {out / name}")
        if fit.error:
            self.stdout.write(self.style.WARNING(f"Regression not fitted: {fit.error}"))
        else:
            for line in fit.reading:
                self.stdout.write(f"  {line}")
        self.stdout.write(self.style.SUCCESS(f"Report: {out / 'report.html'}"))
