"""Estimate by simulation how often the preference-shift analysis detects an effect, per number of groups.

    python manage.py power --experiment hidden-vs-disclosed --groups 10,20,40 --effect 0.2 --reps 100 --seed 1
    python manage.py power --experiment hidden-vs-disclosed --groups 10 --effect 0 --reps 50 --json

Groups are played in memory (no database writes, no server); see experiment/power.py for the model.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from bots.synthetic import SyntheticParams
from experiment import game
from experiment.models import Experiment
from experiment.power import DEFAULT_BEHAVIOUR, EFFECT_HELP, PowerError, estimate_power, pick_arms


def _groups(raw: str) -> list[int]:
    try:
        groups = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise CommandError(f"--groups takes whole numbers separated by commas, e.g. 10,20,40; not {raw!r}.") from None
    if not groups:
        raise CommandError("--groups needs at least one number of groups, e.g. 10,20,40.")
    return groups


class Command(BaseCommand):
    help = ("Estimate, by simulating whole studies of synthetic participants in memory, the probability that the "
            "preference-shift regression (round × condition, clustered by selector) detects a given effect at each "
            f"number of groups. The effect: {EFFECT_HELP}.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--experiment", required=True, help="Slug of an experiment with a hidden and a disclosed arm.")
        parser.add_argument("--groups", required=True, help="Numbers of groups to try, separated by commas, e.g. 10,20,40.")
        parser.add_argument("--effect", type=float, required=True, help=f"The effect: {EFFECT_HELP}. E.g. 0.2.")
        parser.add_argument("--reps", type=int, default=100, help="Simulated studies per number of groups (default 100).")
        parser.add_argument("--alpha", type=float, default=0.05, help="Significance level (default 0.05).")
        parser.add_argument("--seed", type=int, help="Seed (default: random, printed). Same seed, same output.")
        parser.add_argument("--behaviour", action="append", default=[], metavar="NAME=VALUE",
                            help="Other synthetic behaviour (repeatable), e.g. --behaviour learning_rate=0.3; names as "
                                 "in bots/synthetic.py SyntheticParams. bot_bias is set by --effect. Default: the "
                                 f"shared defaults with temperature={DEFAULT_BEHAVIOUR.temperature}.")
        parser.add_argument("--json", action="store_true", help="Print the result as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        experiment = Experiment.objects.filter(slug=options["experiment"]).first()
        if experiment is None:
            known = ", ".join(Experiment.objects.order_by("slug").values_list("slug", flat=True)[:20]) or "none"
            raise CommandError(f"No experiment with slug {options['experiment']!r} (known: {known}).")
        if any(o.strip().replace("-", "_").startswith("bot_bias=") for o in options["behaviour"]):
            raise CommandError("bot_bias is the effect: set it with --effect, not --behaviour.")
        try:
            behaviour = SyntheticParams.from_options(options["behaviour"], base=DEFAULT_BEHAVIOUR)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        conditions = [game.ConditionSpec(name=c.name, disclose_identity=c.disclose_identity,
                                         disclose_from_round=c.disclose_from_round) for c in experiment.conditions.all()]
        groups = _groups(options["groups"])
        seed = options["seed"] if options["seed"] is not None else secrets.randbelow(2**31)
        try:
            arms = pick_arms(conditions)
            rows = estimate_power(params=experiment.params(), conditions=conditions, groups=groups,
                                  effect=options["effect"], reps=options["reps"], seed=seed, alpha=options["alpha"],
                                  behaviour=behaviour)
        except PowerError as exc:
            raise CommandError(str(exc)) from None
        result = {
            "experiment": experiment.slug, "seed": seed, "effect": options["effect"], "alpha": options["alpha"],
            "effect_definition": EFFECT_HELP,
            "test": (f"round:{arms.disclosed.name} in logit P(bot) ~ round × condition (reference {arms.reference.name}), "
                     f"SE clustered by selector; detected when p < alpha and the estimate is positive"),
            "rounds": experiment.n_rounds,
            "behaviour": {k: v for k, v in dataclasses.asdict(behaviour).items() if k != "bot_bias"},
            "rows": [row.as_dict() for row in rows],
        }
        if options["json"]:
            self.stdout.write(json.dumps(result, indent=2))
            return
        self.stdout.write(f"Power for {experiment.slug}: effect {options['effect']} ({EFFECT_HELP}); alpha "
                          f"{options['alpha']}; seed {seed}.")
        self.stdout.write(f"Test: {result['test']}; fits that fail count as not detected.")
        self.stdout.write("Behaviour: " + ", ".join(f"{k}={v}" for k, v in result["behaviour"].items()) +
                          f"; {experiment.n_rounds} rounds.")
        self.stdout.write(f"{'groups':>7} {'reps':>5} {'detected':>9} {'rate':>6}  {'95 % CI':<13} "
                          f"{'mean interaction':>16} {'failures':>8}")
        for row in result["rows"]:
            mean = row["mean_interaction"]
            self.stdout.write(
                f"{row['groups']:>7} {row['reps']:>5} {row['detected']:>9} {row['detection_rate']:>6.2f}  "
                f"{row['detection_low']:.2f}–{row['detection_high']:.2f}     "
                f"{'–' if mean is None else f'{mean:+.3f}':>16} {row['failures']:>8}")
