"""Power by simulation: how often the preference-shift analysis detects an effect with N groups, and whether
its 95 % intervals cover the truth.

For each number of groups and each repetition, N groups' choices are simulated, put in a frame shaped like
:func:`experiment.analysis.choice_frame` and fitted with :func:`experiment.analysis.fit_regression`: the
same logit, clustered by group, with the same small-cluster method (CR2 with Bell–McCaffrey degrees of freedom below 50 groups)
that ``analyze`` reports. Two ways to make the choices:

**The planted estimand** (:class:`Plant`, ``--plant slope=0.3``): choices drawn straight from a logit. For
selector i of group g in round r, log-odds of choosing a bot = logit(start) + u_g + v_i + (b_c + w_g)(r − 1),
with b_c = ``slope`` in the disclosed arm and 0 in the hidden one, a group random intercept u_g ~ N(0,
``group_sd``²), a group random slope w_g ~ N(0, ``group_slope_sd``²) (groups learn at different speeds:
this is what makes the group the unit that matters for a slope) and a selector random intercept v_i ~ N(0,
``selector_sd``²). The random effects make ``slope`` a *conditional* (subject-specific) change; the logit
estimates the *population-averaged* one, which is smaller. :meth:`Plant.target` computes that value exactly
(Gauss–Hermite quadrature of the marginal shares, then the logit line through them) and coverage and bias
are measured against it; the planted conditional value is reported too.

**The behavioural model** (``--effect``): N groups play the experiment's rounds in memory (no database, no
websockets: ``simulate`` and the load benchmark exercise the transport) with the game's own rules
(:mod:`experiment.game`: seats, balanced conditions, candidate order, transfers) and the one synthetic
behaviour (:class:`bots.synthetic.SyntheticHuman` for human seats, the offline :class:`bots.scripted.ScriptedBot`
for bot candidates). The effect is the selectors' initial bias against candidates labelled "AI bot"
(``SyntheticParams.bot_bias``, in return-ratio units: a labelled bot starts valued ``effect`` below a human).
Labels exist only in the disclosed arm, so with effect 0 the arms behave identically (true difference in
trends 0: the false-positive rate). With a positive effect, disclosed selectors choose bots less at first and,
as bots return more than human candidates (scripted bots 45–65 % of what they receive, synthetic humans about
35 %), learn their way towards them: a steeper rise in the disclosed arm. The true value of the difference is
not known in closed form, so only effect 0 reports coverage and bias. The shift needs exploration: a bias so
large (about 0.5 and more at the default temperature) that selectors never try a labelled bot leaves nothing
to learn.
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
from experiment.analysis import FEW_CLUSTERS, fit_regression, wilson

PLANT_HELP = ("the change per round in the log-odds of choosing a bot in the disclosed arm (0 in the hidden arm), "
              "conditional on group and selector; options slope, start, group_sd, group_slope_sd, selector_sd")
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


@dataclass(frozen=True)
class Plant:
    """The planted data-generating process (see the module docstring). Defaults: a typical selector gives
    35 % of round-1 choices to bots; group intercepts SD 0.5, group slopes SD 0.1 per round, selector
    intercepts SD 0.5 (log-odds)."""

    slope: float
    start: float = 0.35
    group_sd: float = 0.5
    group_slope_sd: float = 0.1
    selector_sd: float = 0.5

    def __post_init__(self) -> None:
        for name in ("slope", "start", "group_sd", "group_slope_sd", "selector_sd"):
            if not math.isfinite(getattr(self, name)):
                raise PowerError(f"--plant {name} must be a finite number, not {getattr(self, name)}.")
        if not 0 < self.start < 1:
            raise PowerError(f"--plant start is a share of bot choices in round 1: between 0 and 1, not {self.start}.")
        for name in ("group_sd", "group_slope_sd", "selector_sd"):
            if getattr(self, name) < 0:
                raise PowerError(f"--plant {name} is a standard deviation: 0 or more, not {getattr(self, name)}.")

    @classmethod
    def from_options(cls, options: Sequence[str]) -> Plant:
        """From ``name=value`` strings, each possibly holding several separated by commas; slope is required."""
        names = [f.name for f in dataclasses.fields(cls)]
        values: dict[str, float] = {}
        for option in options:
            for part in (p for p in option.split(",") if p.strip()):
                name, sep, raw = part.partition("=")
                name = name.strip().replace("-", "_")
                if not sep or name not in names:
                    raise PowerError(f"--plant takes name=value with a name among {', '.join(names)}; got {part!r}.")
                try:
                    values[name] = float(raw)
                except ValueError:
                    raise PowerError(f"--plant {name} needs a number, not {raw.strip()!r}.") from None
        if "slope" not in values:
            raise PowerError("--plant needs slope=VALUE (the change per round in log-odds in the disclosed arm), "
                             "e.g. --plant slope=0.3.")
        return cls(**values)

    def marginal_slope(self, slope: float, rounds: int) -> float:
        """The population-averaged slope of an arm with conditional slope ``slope``: the logit line, rounds
        weighted equally, through the shares averaged over the random effects."""
        import numpy as np

        nodes, weights = np.polynomial.hermite_e.hermegauss(60)
        weights = weights / weights.sum()
        r = np.arange(rounds, dtype=float)
        mean = math.log(self.start / (1 - self.start)) + slope * r
        sd = np.sqrt(self.group_sd ** 2 + self.selector_sd ** 2 + (self.group_slope_sd * r) ** 2)
        shares = (1 / (1 + np.exp(-(mean[:, None] + sd[:, None] * nodes[None, :])))) @ weights
        x = np.column_stack([np.ones(rounds), r])
        beta = np.array([mean[0], slope])
        for _ in range(100):  # Newton's method for the logit line through fractional shares
            fitted = 1 / (1 + np.exp(-(x @ beta)))
            step = np.linalg.solve((x * (fitted * (1 - fitted))[:, None]).T @ x, x.T @ (shares - fitted))
            beta = beta + step
            if np.max(np.abs(step)) < 1e-13:
                break
        return float(beta[1])

    def target(self, rounds: int) -> float:
        """What the logit's round × disclosed term estimates: the difference of the arms' marginal slopes."""
        return self.marginal_slope(self.slope, rounds) - self.marginal_slope(0.0, rounds)


@dataclass
class PowerRow:
    groups: int
    reps: int
    truth: float | None = None
    method: str = ""
    detected: int = 0
    rejected: int = 0
    covered: int = 0
    failures: int = 0
    estimates: list[float] = field(default_factory=list)

    @property
    def fitted(self) -> int:
        return self.reps - self.failures

    @property
    def rate(self) -> float:
        return self.detected / self.reps if self.reps else 0.0

    def as_dict(self) -> dict[str, Any]:
        low, high = wilson(self.detected, self.reps)
        rlow, rhigh = wilson(self.rejected, self.reps)
        mean = sum(self.estimates) / len(self.estimates) if self.estimates else None
        known = self.truth is not None and self.fitted > 0
        clow, chigh = wilson(self.covered, self.fitted) if known else (None, None)
        return {"groups": self.groups, "reps": self.reps, "method": self.method,
                "detected": self.detected, "detection_rate": self.rate, "detection_low": low, "detection_high": high,
                "rejected": self.rejected, "rejection_rate": self.rejected / self.reps if self.reps else 0.0,
                "rejection_low": rlow, "rejection_high": rhigh,
                "mean_estimate": mean, "truth": self.truth,
                "bias": mean - self.truth if known and mean is not None else None,
                "covered": self.covered if known else None, "coverage": self.covered / self.fitted if known else None,
                "coverage_low": clow, "coverage_high": chigh, "failures": self.failures}


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
        rows += [{"bot": int(is_bot[chosen]), "round": r, "condition": condition.name, "selector_id": f"{group}/{s}",
                  "group_id": group, "session_id": 1} for s, (chosen, _) in picks.items()]
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
    return pd.DataFrame.from_records(rows, columns=FRAME_COLUMNS)


FRAME_COLUMNS = ["bot", "round", "condition", "selector_id", "group_id", "session_id"]


def planted_frame(*, params: game.Params, arms: Arms, n_groups: int, plant: Plant, seed: int) -> Any:
    """Choices of ``n_groups`` groups drawn from the planted logit (module docstring); conditions balanced as a
    session assigns them, every human selector choosing in every round."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    selectors = params.n_selectors - params.n_bot_selectors
    rounds = np.arange(params.n_rounds, dtype=float)
    base = math.log(plant.start / (1 - plant.start))
    counts = {arms.reference.name: 0, arms.disclosed.name: 0}
    parts = []
    for number in range(1, n_groups + 1):
        name = game.pick_condition(counts, seed, number)
        counts[name] += 1
        slope = plant.slope if name == arms.disclosed.name else 0.0
        u, w = rng.normal(0.0, plant.group_sd), rng.normal(0.0, plant.group_slope_sd)
        v = rng.normal(0.0, plant.selector_sd, size=selectors)
        eta = base + u + v[:, None] + (slope + w) * rounds[None, :]
        bot = (rng.random(eta.shape) < 1 / (1 + np.exp(-eta))).astype(int)
        parts.append(pd.DataFrame({
            "bot": bot.ravel(), "round": np.tile(rounds.astype(int) + 1, selectors), "condition": name,
            "selector_id": np.repeat([f"{number}/S{i + 1}" for i in range(selectors)], params.n_rounds),
            "group_id": str(number), "session_id": 1}))
    return pd.concat(parts, ignore_index=True)[FRAME_COLUMNS]


def estimate_power(*, params: game.Params, conditions: Sequence[game.ConditionSpec], groups: Sequence[int],
                   effect: float | None = None, plant: Plant | None = None, reps: int, seed: int, alpha: float = 0.05,
                   behaviour: SyntheticParams | None = None, cluster: str = "group", inference: str = "auto",
                   draws: int = 999, progress: Callable[[int, int], None] | None = None) -> list[PowerRow]:
    """Per number of groups, over ``reps`` simulated studies: how often the round × disclosed term is rejected
    (two-sided, level ``alpha``) and detected (rejected with a positive estimate), the mean estimate, and, when
    the true value is known, how often the 95 % interval covers it (the test of the true value is not
    rejected: for the score bootstrap that is exactly the test-inverted interval covering it). Give either
    ``effect`` (the behavioural model) or ``plant``. Fits that fail count as not detected (and as failures)."""
    from experiment.analysis import check_inference

    arms = pick_arms(conditions)
    if (effect is None) == (plant is None):
        raise PowerError("Give either an effect of the behavioural model (--effect) or a planted slope (--plant).")
    if reps < 1:
        raise PowerError(f"Repetitions must be at least 1, not {reps}.")
    if not groups or any(n < 2 for n in groups):
        raise PowerError("Each number of groups must be at least 2 (one per condition), e.g. --groups 10,20,40.")
    if not 0 < alpha < 1:
        raise PowerError(f"Alpha must be between 0 and 1, not {alpha}.")
    if effect is not None and (not math.isfinite(effect) or effect < 0):
        raise PowerError(f"The effect is a bias against labelled bots: a number of 0 or more, not {effect}.")
    if draws < 99:
        raise PowerError(f"Use at least 99 bootstrap draws, not {draws}.")
    try:
        check_inference(cluster=cluster, inference=inference)
    except ValueError as exc:
        raise PowerError(str(exc)) from None
    if params.n_selectors - params.n_bot_selectors < 1 or params.n_bot_candidates < 1 \
            or params.n_bot_candidates >= params.n_candidates:
        raise PowerError("Power needs human selectors and both bot and human candidates in each group.")
    if params.n_rounds < 2:
        raise PowerError("A change across rounds needs at least 2 rounds.")
    truth = plant.target(params.n_rounds) if plant is not None else (0.0 if effect == 0 else None)
    order = {arms.reference.name: 0, arms.disclosed.name: 1}
    term = {f"round:{arms.disclosed.name}": 1.0}
    rows = []
    for n_groups in groups:
        row = PowerRow(groups=n_groups, reps=reps, truth=truth)
        for rep in range(reps):
            rep_seed = game.rng(seed, "power-rep", n_groups, rep).randrange(2**31)
            if plant is not None:
                frame = planted_frame(params=params, arms=arms, n_groups=n_groups, plant=plant, seed=rep_seed)
            else:
                frame = simulate_frame(params=params, arms=arms, n_groups=n_groups, effect=effect, seed=rep_seed,
                                       behaviour=behaviour)
            fit = fit_regression(frame=frame, conditions_order=order, describe=False, intervals=False, mixed=False,
                                 cluster=cluster, inference=inference, draws=draws, seed=rep_seed)
            difference = next((d for d in fit.differences if d.condition == arms.disclosed.name), None)
            if fit.error or difference is None:
                row.failures += 1
            else:
                row.method = row.method or fit.method
                row.estimates.append(difference.estimate)
                rejected = difference.p <= alpha
                row.rejected += int(rejected)
                row.detected += int(rejected and difference.estimate > 0)
                if truth is not None:
                    row.covered += int(fit.test(term, truth) > alpha)
            if progress:
                progress(n_groups, rep + 1)
        rows.append(row)
    return rows


def method_for(groups: int, inference: str) -> str:
    """The method ``fit_regression`` picks for a number of group clusters."""
    if inference == "auto":
        return "cr2" if groups < FEW_CLUSTERS else "crve"
    return {"bootstrap": "score-bootstrap"}.get(inference, inference)
