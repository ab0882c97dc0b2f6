"""Run AI-only groups (a bot in every seat) without any browser, and print what they stored.

    python manage.py society --experiment ai-only-demo --groups 10 --seed 7
    python manage.py society --experiment mixed --groups 20 --condition ai-only --session 12 --json

The groups play through the same services, rules, deadlines and logs as people's groups. On the embedded
default the jobs run in this command's process; in production (Celery) the workers and beat run them and
the command watches. ``--no-wait`` starts the groups and returns.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from experiment import society
from experiment.models import Experiment, Session


class Command(BaseCommand):
    help = "Start N AI-only groups of an experiment's AI-only arms, wait for them to finish, and print a summary."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--experiment", required=True, help="Slug of the experiment.")
        parser.add_argument("--groups", type=int, required=True, help="Number of AI-only groups to start.")
        parser.add_argument("--seed", type=int, help="Seed of a new session (default: random, printed).")
        parser.add_argument("--condition", help="Put every group in this AI-only condition (default: balanced over them).")
        parser.add_argument("--session", type=int, help="Add the groups to this session (default: a new session).")
        parser.add_argument("--time-limit", type=float, help="Stop waiting after this many seconds "
                                                              "(default: the longest the design can take, plus margin).")
        parser.add_argument("--no-wait", action="store_true", help="Start the groups and return (Celery runs them).")
        parser.add_argument("--json", action="store_true", help="Print the summary as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        experiment = Experiment.objects.filter(slug=options["experiment"]).first()
        if experiment is None:
            known = ", ".join(Experiment.objects.order_by("slug").values_list("slug", flat=True)[:20]) or "none"
            raise CommandError(f"No experiment with slug {options['experiment']!r} (known: {known}).")
        if options["groups"] < 1:
            raise CommandError("--groups must be 1 or more.")
        session = None
        if options["session"] is not None:
            session = Session.objects.filter(pk=options["session"]).first()
            if session is None:
                raise CommandError(f"No session with id {options['session']}.")
        if options["no_wait"] and options["time_limit"] is not None:
            raise CommandError("--time-limit has no meaning with --no-wait.")
        seed = options["seed"] if options["seed"] is not None else secrets.randbelow(2**31)
        quiet = options["json"] or options["verbosity"] == 0
        try:
            run = society.run(experiment=experiment, groups=options["groups"], seed=seed, condition=options["condition"],
                              session=session, time_limit=options["time_limit"], wait_for_end=not options["no_wait"],
                              progress=None if quiet else self.stdout.write)
        except society.SocietyError as exc:
            raise CommandError(str(exc)) from None
        s = society.summary(run)
        self.stdout.write(json.dumps(s, indent=2, default=str) if options["json"] else self._text(s))
        if not options["no_wait"] and s["groups_finished"] < s["groups"]:
            raise CommandError(f"{s['groups'] - s['groups_finished']} of {s['groups']} groups did not finish within "
                               "the time limit.")

    @staticmethod
    def _text(s: dict[str, Any]) -> str:
        stored = s["stored"]
        lines = [
            f"AI-only society of {s['experiment']!r}: session {s['session']}, seed {s['seed']}",
            f"  groups finished   {s['groups_finished']} of {s['groups']}  {s['groups_by_condition']}",
            f"  stored            {stored['messages']} messages, {stored['choices']} choices, {stored['returns']} returns, "
            f"{stored['beliefs']} beliefs",
            f"  timed out         {stored['timed_out_pitches']} pitches, {stored['timed_out_choices']} choices, "
            f"{stored['timed_out_returns']} returns ({s['defaults_applied']} defaults applied)",
            f"  bot turns         {s.get('bot_turns', {})}",
            f"  LLM calls         {s.get('llm_calls', {})}",
            f"  duration          {s['duration_s']} s",
        ]
        return "\n".join(lines)
