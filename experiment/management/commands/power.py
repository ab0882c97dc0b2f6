"""Estimate by simulation how often the preference-shift analysis detects an effect, and whether its intervals
cover the truth, per number of groups.

    python manage.py power --experiment hidden-vs-disclosed --groups 10,20,40,80 --plant slope=0.3 --reps 200 --seed 1
    python manage.py power --experiment hidden-vs-disclosed --groups 10,20,40,80 --plant slope=0 --reps 200 --seed 2
    python manage.py power --experiment hidden-vs-disclosed --groups 10,20,40 --effect 0.2 --reps 100 --seed 1
    python manage.py power --experiment hidden-vs-disclosed --groups 10 --effect 0 --reps 50 --json

Groups are simulated in memory (no database writes, no server); see experiment/power.py for both models and
docs/analysis.md for measured results.
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
from experiment.power import (
    DEFAULT_BEHAVIOUR,
    EFFECT_HELP,
    PLANT_HELP,
    Plant,
    PowerError,
    estimate_power,
    pick_arms,
)


def _groups(raw: str) -> list[int]:
    try:
        groups = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise CommandError(f"--groups takes whole numbers separated by commas, e.g. 10,20,40; not {raw!r}.") from None
    if not groups:
        raise CommandError("--groups needs at least one number of groups, e.g. 10,20,40.")
    if any(n < 2 for n in groups):
        raise CommandError(f"Each number of groups must be at least 2 (one per condition); got {raw!r}.")
    return groups


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


class Command(BaseCommand):
    help = ("Estimate, by simulating whole studies in memory, how often the preference-shift regression (round × "
            "condition, clustered by group, small-cluster method below 50 groups) detects an effect at each number "
            f"of groups, its bias and the coverage of its 95 % interval. Either --plant: {PLANT_HELP}; or --effect: "
            f"{EFFECT_HELP}.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--experiment", required=True, help="Slug of an experiment with a hidden and a disclosed arm.")
        parser.add_argument("--groups", required=True, help="Numbers of groups to try, separated by commas, e.g. 10,20,40.")
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--effect", type=float, help=f"The behavioural model's effect: {EFFECT_HELP}. E.g. 0.2.")
        which.add_argument("--plant", action="append", metavar="NAME=VALUE",
                           help=f"Plant the estimand (repeatable or comma-separated): {PLANT_HELP}. E.g. --plant "
                                "slope=0.3,start=0.35. Defaults: start=0.35, group_sd=0.5, group_slope_sd=0.1, "
                                "selector_sd=0.5 (log-odds).")
        parser.add_argument("--reps", type=int, default=100, help="Simulated studies per number of groups (default 100).")
        parser.add_argument("--alpha", type=float, default=0.05, help="Two-sided significance level (default 0.05).")
        parser.add_argument("--seed", type=int, help="Seed (default: random, printed). Same seed, same output.")
        parser.add_argument("--cluster", default="group", help="Cluster level of the analysis: group (default), "
                                                               "session or selector.")
        parser.add_argument("--inference", default="auto", help="auto (default), cr2, bootstrap or crve, as in analyze.")
        parser.add_argument("--draws", type=int, default=999, help="Bootstrap draws per fit (default 999).")
        parser.add_argument("--behaviour", action="append", default=[], metavar="NAME=VALUE",
                            help="Other synthetic behaviour (repeatable), e.g. --behaviour learning_rate=0.3; names as "
                                 "in bots/synthetic.py SyntheticParams. bot_bias is set by --effect. Default: the "
                                 f"shared defaults with temperature={DEFAULT_BEHAVIOUR.temperature}.")
        parser.add_argument("--json", action="store_true", help="Print the result as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        groups = _groups(options["groups"])
        try:
            plant = Plant.from_options(options["plant"]) if options["plant"] else None
        except PowerError as exc:
            raise CommandError(str(exc)) from None
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
        seed = options["seed"] if options["seed"] is not None else secrets.randbelow(2**31)
        try:
            arms = pick_arms(conditions)
            rows = estimate_power(params=experiment.params(), conditions=conditions, groups=groups,
                                  effect=options["effect"], plant=plant, reps=options["reps"], seed=seed,
                                  alpha=options["alpha"], behaviour=behaviour, cluster=options["cluster"],
                                  inference=options["inference"], draws=options["draws"])
        except PowerError as exc:
            raise CommandError(str(exc)) from None
        term = f"round:{arms.disclosed.name}"
        result: dict[str, Any] = {
            "experiment": experiment.slug, "seed": seed, "alpha": options["alpha"], "rounds": experiment.n_rounds,
            "model": "planted" if plant else "behavioural",
            "cluster": options["cluster"], "inference": options["inference"], "draws": options["draws"],
            "test": (f"{term} in logit P(bot) ~ round × condition (reference {arms.reference.name}), clustered by "
                     f"{options['cluster']}; two-sided at alpha; rejected: p <= alpha; detected: rejected with a "
                     "positive estimate; covered: the test of the true value is not rejected (the 95 % interval "
                     "contains it)"),
        }
        if plant:
            result |= {"plant": dataclasses.asdict(plant), "plant_definition": PLANT_HELP,
                       "truth_definition": "population-averaged difference in slopes implied by the plant (what the "
                                           "logit estimates); the planted conditional slope is plant.slope"}
        else:
            result |= {"effect": options["effect"], "effect_definition": EFFECT_HELP,
                       "behaviour": {k: v for k, v in dataclasses.asdict(behaviour).items() if k != "bot_bias"}}
        result["rows"] = [row.as_dict() for row in rows]
        if options["json"]:
            self.stdout.write(json.dumps(result, indent=2))
            return
        if plant:
            self.stdout.write(f"Power for {experiment.slug}, planted: " + ", ".join(
                f"{k}={v}" for k, v in result["plant"].items()) + f"; {experiment.n_rounds} rounds; alpha "
                f"{options['alpha']}; seed {seed}.")
            self.stdout.write(f"True value of {term} (population-averaged): {rows[0].truth:+.4f} log-odds per round.")
        else:
            self.stdout.write(f"Power for {experiment.slug}: effect {options['effect']} ({EFFECT_HELP}); alpha "
                              f"{options['alpha']}; seed {seed}.")
            self.stdout.write("Behaviour: " + ", ".join(f"{k}={v}" for k, v in result["behaviour"].items()) +
                              f"; {experiment.n_rounds} rounds.")
        self.stdout.write(f"Test: {result['test']}; fits that fail count as not detected.")
        self.stdout.write(f"{'groups':>6} {'reps':>5} {'method':>15} {'detected':>9} {'95 % CI':<11} {'rejected':>8} "
                          f"{'mean est.':>9} {'bias':>7} {'coverage':>8} {'95 % CI':<11} {'failures':>8}")
        for row in result["rows"]:
            cov = row["coverage"]
            self.stdout.write(
                f"{row['groups']:>6} {row['reps']:>5} {row['method'] or '–':>15} {row['detection_rate']:>9.3f} "
                f"{row['detection_low']:.2f}–{row['detection_high']:.2f}   {row['rejection_rate']:>8.3f} "
                f"{_num(row['mean_estimate'], '+.3f'):>9} {_num(row['bias'], '+.3f'):>7} {_num(cov, '.3f'):>8} "
                + (f"{row['coverage_low']:.2f}–{row['coverage_high']:.2f}" if cov is not None else "–" + " " * 10)
                + f" {row['failures']:>8}")
