"""Power by simulation: how often the preference-shift analysis detects a given effect with N groups.

For each number of groups and each repetition, N groups play the experiment's rounds in memory (no
database, no websockets: ``simulate`` and the load benchmark exercise the transport) with the game's
own rules (:mod:`experiment.game`: seats, balanced conditions, candidate order, transfers) and the one
synthetic behaviour (:class:`bots.synthetic.SyntheticHuman` for human seats, the offline
:class:`bots.scripted.ScriptedBot` for bot candidates). The choices go into a frame shaped like
:func:`experiment.analysis.choice_frame` and are fitted with :func:`experiment.analysis.fit_regression`,
the same logistic regression with standard errors clustered by selector that ``analyze`` reports.

The effect is the selectors' initial bias against candidates labelled "AI bot" (``SyntheticParams.bot_bias``,
in return-ratio units: a labelled bot starts valued ``effect`` below a human). Labels exist only in the
disclosed arm, so with effect 0 the arms behave identically (no difference in trend, the null the test
is about). With a positive effect, disclosed selectors choose bots less at first and, as bots return
more than human candidates (scripted bots 45–65 % of what they receive, synthetic humans about 35 %),
learn their way towards them: a steeper rise in the disclosed arm, a positive round × disclosed term.
The shift needs exploration: a bias so large (about 0.5 and more at the default temperature) that selectors
never try a labelled bot leaves nothing to learn, and the detectable effect shrinks again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bots.scripted import ScriptedBot
from bots.synthetic import SyntheticHuman, SyntheticParams
from experiment import game
from experiment.analysis import fit_regression, wilson

EFFECT_HELP = ("initial bias of selectors against candidates labelled \"AI bot\" (SyntheticParams.bot_bias, in "
               "return-ratio units) in the condition that discloses identity; 0 means the arms behave alike")


# Power's default behaviour: the shared defaults with more exploration. At the shared temperature (0.1) a
# biased selector almost never tries a labelled bot, so it never learns and a bias gives no shift to detect.
DEFAULT_BEHAVIOUR = SyntheticParams(temperature=0.25)


class PowerError(ValueError):
    """The design or the options cannot give a power estimate; the message says what to change."""


@dataclass(frozen=True)
class Arms:
    """The two arms compared: the reference (no labels) and the one that discloses identity."""

    reference: game.ConditionSpec
    disclosed: game.ConditionSpec


@dataclass
class PowerRow:
    groups: int
    reps: int
    detected: int = 0
    failures: int = 0
    estimates: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.detected / self.reps if self.reps else 0.0

    def as_dict(self) -> dict[str, Any]:
        low, high = wilson(self.detected, self.reps)
        mean = sum(self.estimates) / len(self.estimates) if self.estimates else None
        return {"groups": self.groups, "reps": self.reps, "detected": self.detected, "detection_rate": self.rate,
                "detection_low": low, "detection_high": high, "mean_interaction": mean, "failures": self.failures}


def pick_arms(conditions: Sequence[game.ConditionSpec]) -> Arms:
    """The design must have exactly two arms, one without identity labels and one with them."""
    hidden = [c for c in conditions if not c.disclose_identity]
    disclosed = [c for c in conditions if c.disclose_identity]
    if len(conditions) != 2 or len(hidden) != 1 or len(disclosed) != 1:
        names = ", ".join(f"{c.name} ({'labels' if c.disclose_identity else 'no labels'})" for c in conditions) or "none"
        raise PowerError("Power compares two conditions, one without identity labels and one that discloses them "
                         f"(like the hidden-vs-disclosed preset); this experiment has: {names}.")
    return Arms(reference=hidden[0], disclosed=disclosed[0])


def play_group(*, params: game.Params, condition: game.ConditionSpec, seed: int, group: str,
               behaviour: SyntheticParams) -> list[dict[str, Any]]:
    """One group's counted choices: rows with bot, round, condition, selector_id (as choice_frame has them).

    Only the choice and return phases are played: the synthetic selector's choice depends on the labels and
    its history of returns, not on the pitch text, and bot selectors' choices are not counted by the analysis
    and change nothing a human selector sees. A skipped choice (dropout) is left out like a deadline default,
    a skipped return counts as 0 like the deadline default.
    """
    plans = game.plan_seats(params.n_humans, params, seed)
    selectors = [p.seat for p in plans if p.role == "selector" and not p.is_bot]
    is_bot = {p.seat: p.is_bot for p in plans if p.role == "candidate"}
    candidates = sorted(is_bot)
    policy = game.LabelPolicy(disclose=condition.disclose_identity, from_round=condition.disclose_from_round)
    human, bot = SyntheticHuman(behaviour), ScriptedBot()
    decisions = game.rng(seed, "power-decisions")
    experiment = {"endowment": params.endowment, "multiplier": params.multiplier, "fixed_send": params.fixed_send,
                  "message_max_chars": params.message_max_chars}
    history = {s: {c: {"rounds": [], "sent": 0, "returned": 0} for c in candidates} for s in selectors}
    rows: list[dict[str, Any]] = []
    for r in range(1, params.n_rounds + 1):
        picks: dict[str, tuple[str, int]] = {}
        for s in selectors:
            order = game.candidate_order(seed, s, r, candidates)
            cards = [{"seat": c, "label": game.identity_label(policy, r, is_bot[c]), "position": i + 1,
                      "history": history[s][c]} for i, c in enumerate(order)]
            actions = human.decide({"experiment": experiment, "game": {"phase": "choice", "round": r, "todo": True,
                                                                       "candidates": cards}}, decisions)
            if actions:
                picks[s] = (actions[0]["candidate"], game.check_sent(actions[0]["amount"], params))
        for c in candidates:
            to_return = [{"selector": s, "multiplied": game.multiplied(sent, params), "returned": None}
                         for s, (chosen, sent) in picks.items() if chosen == c]
            if not to_return:
                continue
            actor = bot if is_bot[c] else human
            state = {"experiment": experiment, "me": {"seat": c},
                     "game": {"phase": "return", "round": r, "todo": True, "to_return": to_return}}
            returned = {a["selector"]: a["amount"] for a in actor.decide(state, decisions)}
            for t in to_return:
                s = t["selector"]
                h = history[s][c]
                h["rounds"].append(r)
                h["sent"] += picks[s][1]
                h["returned"] += game.check_returned(returned.get(s, 0), t["multiplied"])
        rows += [{"bot": int(is_bot[chosen]), "round": r, "condition": condition.name, "selector_id": f"{group}/{s}"}
                 for s, (chosen, _) in picks.items()]
    return rows


def simulate_frame(*, params: game.Params, arms: Arms, n_groups: int, effect: float, seed: int,
                   behaviour: SyntheticParams | None = None) -> Any:
    """Choices of ``n_groups`` groups, conditions assigned as a session balances them (a pandas DataFrame)."""
    import pandas as pd

    synthetic = dataclasses.replace(behaviour or DEFAULT_BEHAVIOUR, bot_bias=effect)
    by_name = {arms.reference.name: arms.reference, arms.disclosed.name: arms.disclosed}
    counts = dict.fromkeys(by_name, 0)
    rows: list[dict[str, Any]] = []
    for number in range(1, n_groups + 1):
        name = game.pick_condition(counts, seed, number)
        counts[name] += 1
        group_seed = game.rng(seed, "power-group", number).randrange(2**31)
        rows += play_group(params=params, condition=by_name[name], seed=group_seed, group=str(number),
                           behaviour=synthetic)
    return pd.DataFrame.from_records(rows, columns=["bot", "round", "condition", "selector_id"])


def estimate_power(*, params: game.Params, conditions: Sequence[game.ConditionSpec], groups: Sequence[int],
                   effect: float, reps: int, seed: int, alpha: float = 0.05,
                   behaviour: SyntheticParams | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[PowerRow]:
    """Per number of groups: how many of ``reps`` simulated studies find p < alpha for the round × disclosed
    term with a positive estimate. Fits that fail count as not detected (and as failures)."""
    arms = pick_arms(conditions)
    if reps < 1:
        raise PowerError(f"Repetitions must be at least 1, not {reps}.")
    if not groups or any(n < 2 for n in groups):
        raise PowerError("Each number of groups must be at least 2 (one per condition), e.g. --groups 10,20,40.")
    if not 0 < alpha < 1:
        raise PowerError(f"Alpha must be between 0 and 1, not {alpha}.")
    if not math.isfinite(effect) or effect < 0:
        raise PowerError(f"The effect is a bias against labelled bots: a number of 0 or more, not {effect}.")
    if params.n_selectors - params.n_bot_selectors < 1 or params.n_bot_candidates < 1 \
            or params.n_bot_candidates >= params.n_candidates:
        raise PowerError("Power needs human selectors and both bot and human candidates in each group.")
    if params.n_rounds < 2:
        raise PowerError("A change across rounds needs at least 2 rounds.")
    order = {arms.reference.name: 0, arms.disclosed.name: 1}
    rows = []
    for n_groups in groups:
        row = PowerRow(groups=n_groups, reps=reps)
        for rep in range(reps):
            rep_seed = game.rng(seed, "power-rep", n_groups, rep).randrange(2**31)
            frame = simulate_frame(params=params, arms=arms, n_groups=n_groups, effect=effect, seed=rep_seed,
                                   behaviour=behaviour)
            fit = fit_regression(frame=frame, conditions_order=order, describe=False)
            term = next((d for d in fit.differences if d.condition == arms.disclosed.name), None)
            if fit.error or term is None:
                row.failures += 1
            else:
                row.estimates.append(term.estimate)
                row.detected += int(term.p < alpha and term.estimate > 0)
            if progress:
                progress(n_groups, rep + 1)
        rows.append(row)
    return rows
