"""Play whole sessions with synthetic participants over real websockets, as browsers do.

    python manage.py simulate --experiment demo --groups 4 --seed 7 --time-scale 0.1
    python manage.py simulate --experiment demo --groups 4 --server http://127.0.0.1:8000 --json

Without ``--server`` the built-in server (uvicorn, these settings, this database) runs for the
duration of the command. With ``--server`` the server must use the same database as this command
(the session is created here) and run its own scheduler (in-process, or Celery in production).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from bots.synthetic import SyntheticParams
from experiment.models import Experiment
from experiment.simulation import SimulationError, simulate


class Command(BaseCommand):
    help = ("Run a session with N groups of synthetic participants that connect over real websockets, and print a "
            "summary (groups completed, rounds, decisions, errors, duration, latencies).")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--experiment", required=True, help="Slug of the experiment to simulate.")
        parser.add_argument("--groups", type=int, required=True, help="Number of groups of synthetic humans.")
        parser.add_argument("--server", help="Base URL of a running server (default: start the built-in server).")
        parser.add_argument("--seed", type=int, help="Seed of the session and of every synthetic decision "
                                                     "(default: random, printed). Same seed, same decisions and payoffs.")
        parser.add_argument("--json", action="store_true", help="Print the summary as JSON.")
        parser.add_argument("--time-scale", type=float, default=1.0,
                            help="Multiplies the synthetic humans' response times (0.1: ten times faster). Phase "
                                 "durations and bot timing are the experiment's.")
        parser.add_argument("--behaviour", action="append", default=[], metavar="NAME=VALUE",
                            help="Synthetic behaviour parameter (repeatable), e.g. --behaviour bot_bias=0.2 "
                                 "--behaviour dropout=0.05. Names: see bots/synthetic.py SyntheticParams.")
        parser.add_argument("--port", type=int, help="Port of the built-in server on 127.0.0.1 (default: any free port).")
        parser.add_argument("--time-limit", type=float,
                            help="Stop after this many seconds (default: the longest the design can take, plus margin).")

    def handle(self, *args: Any, **options: Any) -> None:
        experiment = Experiment.objects.filter(slug=options["experiment"]).first()
        if experiment is None:
            known = ", ".join(Experiment.objects.order_by("slug").values_list("slug", flat=True)[:20]) or "none"
            raise CommandError(f"No experiment with slug {options['experiment']!r} (known: {known}).")
        if not experiment.conditions.exists():
            raise CommandError(f"Experiment {experiment.slug!r} has no conditions; add one in the admin first.")
        try:
            params = SyntheticParams.from_options(options["behaviour"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        seed = options["seed"] if options["seed"] is not None else secrets.randbelow(2**31)
        quiet = options["json"] or options["verbosity"] == 0
        try:
            run = simulate(experiment=experiment, groups=options["groups"], seed=seed, server_url=options["server"],
                           params=params, time_scale=options["time_scale"], port=options["port"],
                           time_limit=options["time_limit"], progress=None if quiet else self.stdout.write)
        except SimulationError as exc:
            raise CommandError(str(exc)) from None
        s = run.summary
        if options["json"]:
            self.stdout.write(json.dumps(s, indent=2, default=str))
        else:
            self.stdout.write(self._text(s))
        problems = []
        if s["errors"]:
            problems.append(f"{s['errors']} errors")
        if s["groups_completed"] < s["groups"]:
            problems.append(f"{s['groups'] - s['groups_completed']} of {s['groups']} groups did not finish")
        if s["groups_stalled"]:
            problems.append(f"groups {s['groups_stalled']} went past their deadline budget")
        if problems:
            raise CommandError("Simulation finished with problems: " + "; ".join(problems) + ".")

    @staticmethod
    def _text(s: dict[str, Any]) -> str:
        def ms(p: dict[str, Any]) -> str:
            if not p["n"]:
                return "no samples"
            return f"p50 {p['p50']} ms, p95 {p['p95']} ms, p99 {p['p99']} ms, max {p['max']} ms (n={p['n']})"

        stored = s["stored"]
        lines = [
            f"Simulation of {s['experiment']!r}, session {s['session']}, seed {s['seed']}, server {s['server']}",
            f"  groups completed  {s['groups_completed']} of {s['groups']}"
            + (f"  (stalled: {s['groups_stalled']})" if s["groups_stalled"] else ""),
            f"  rounds            {s['rounds']}",
            f"  decisions         {s['decisions']} by {s['clients']} synthetic humans "
            f"(stored: {stored['messages']} messages, {stored['choices']} choices, {stored['returns']} returns, "
            f"{stored['beliefs']} beliefs; {stored['timed_out_choices']} choices timed out)",
            f"  errors            {s['errors']}" + (f"  {s['errors_by_kind']}" if s["errors"] else ""),
            f"  duration          {s['duration_s']} s",
            f"  action → ack      {ms(s['ack_ms'])}",
            f"  phase change      {ms(s['phase_change_ms'])}",
        ]
        lines += [f"    {e['code']}: {e['message']}" for e in s["error_examples"]]
        return "\n".join(lines)
