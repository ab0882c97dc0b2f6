"""The preference-shift analysis: how the share of selectors choosing bots changes across rounds, by condition.

- :func:`summary_rows`: per condition × round, the number of choices, the share going to bot candidates
  with a 95 % interval clustered by group (a design-effect-adjusted Wilson interval), mean amount sent and
  mean return ratio by partner type. Aggregated by the database, so it is cheap enough for a staff page.
- :func:`belief_rows`: belief accuracy (misattribution) where identity was hidden.
- :func:`plot`: share of bot choices by round with the interval as a band, per condition (PNG or SVG).
- :func:`regression`: logistic regression of choosing a bot on round × condition, inference clustered by
  group (session and selector on request) with a small-cluster method (:mod:`experiment.inference`) when
  there are fewer than 50 clusters, a mixed-effects logit as a robustness line, and a reading in plain words.
  docs/analysis.md explains what is estimated, how and why.
- :func:`report_html`: all of it in one self-contained HTML page (``manage.py analyze``).

pandas, statsmodels and matplotlib are imported inside the functions that need them: importing this
module costs nothing, and nothing here is on a participant's request path.

What counts as a choice: a human selector seat choosing a candidate. Choices applied by default at a
deadline (``timed_out``) are left out unless ``include_timeouts`` (a random default is not a
preference), and so are "no choice" rows. Choices in a round still being played count; return ratios
count once the return is decided.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from django.db.models import Avg, Count, F, FloatField, Q, QuerySet, Value
from django.db.models.functions import Cast, NullIf
from django.template.loader import render_to_string

from experiment import adaptation
from experiment.export import Scope
from experiment.models import Belief, Choice, Condition, Participant

P = Participant
Z95 = 1.959963984540054
REFERENCE_CONDITION = "hidden"


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval for a proportion (None, None when n = 0)."""
    if n <= 0:
        return None, None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n successes the bound is exactly 0 or 1; float rounding would leave 5e-17.
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return low, high


# ---- the summary ---------------------------------------------------------------------------------------

SUMMARY_COLUMNS: list[tuple[str, str]] = [
    ("condition", "Condition (treatment arm)."),
    ("disclosed", "Whether the condition shows Human / AI bot labels."),
    ("round", "Round number, from 1."),
    ("n_choices", "Choices counted: human selectors who chose a candidate (defaults at the deadline left out)."),
    ("n_bot", "Of these, choices of a bot candidate."),
    ("share_bot", "n_bot / n_choices."),
    ("share_bot_low", "Lower end of the 95 % interval of share_bot, clustered (see cluster): Wilson interval with the "
                      "design-effect-adjusted sample size and Student's t on n_clusters − 1 degrees of freedom."),
    ("share_bot_high", "Upper end of the same 95 % clustered interval of share_bot."),
    ("cluster", "Unit the interval is clustered by: group (default), session or selector."),
    ("n_clusters", "Clusters with at least one counted choice in this condition × round."),
    ("design_effect", "Variance of share_bot from the cluster totals over the binomial variance, floored at 1."),
    ("mean_sent_bot", "Mean points sent to bot candidates."),
    ("mean_sent_human", "Mean points sent to human candidates."),
    ("mean_return_ratio_bot", "Mean of returned / (sent × multiplier) for bot candidates (returns decided, sent > 0)."),
    ("mean_return_ratio_human", "Mean of returned / (sent × multiplier) for human candidates (returns decided, sent > 0)."),
    ("n_returns_bot", "Returns behind mean_return_ratio_bot."),
    ("n_returns_human", "Returns behind mean_return_ratio_human."),
]

BELIEF_COLUMNS: list[tuple[str, str]] = [
    ("condition", "Condition (treatment arm) with hidden identity."),
    ("round", "Belief round."),
    ("true_kind", "What the candidates judged really are: human or bot."),
    ("n", "Guesses asked (human selectors × candidates of this kind)."),
    ("guessed_bot", "Guesses \"bot\"."),
    ("guessed_human", "Guesses \"human\"."),
    ("no_guess", "No answer before the deadline."),
    ("accuracy", "Share of answered guesses that are right."),
    ("accuracy_low", "Lower end of the 95 % interval of accuracy (Wilson, clustered like the choice summary)."),
    ("accuracy_high", "Upper end of the 95 % interval of accuracy (Wilson, clustered like the choice summary)."),
    ("misattributed", "Share of answered guesses that are wrong (a bot taken for a human, or the reverse)."),
    ("mean_confidence", "Mean confidence of the answered guesses (percent)."),
    ("cluster", "Unit the interval is clustered by: group (default), session or selector."),
    ("n_clusters", "Clusters with answered guesses in this row."),
    ("design_effect", "Variance of accuracy from cluster totals over the binomial variance (at least 1)."),
]


def _conditions_order(scope: Scope) -> dict[str, int]:
    names = Condition.objects.filter(scope.q("groups__session")).order_by("id").values_list("name", flat=True)
    order: dict[str, int] = {}
    for name in names:
        order.setdefault(name, len(order))
    return order


def counted_choices(*, scope: Scope, include_timeouts: bool = False) -> QuerySet:
    """Choices people made in human selector seats. A choice a bot or synthetic filler made in such a seat
    (after a takeover, or in a demo) is not a human preference and is left out."""
    machine = [P.Controller.SCRIPTED, P.Controller.LLM, P.Controller.SYNTHETIC]
    qs = (Choice.objects.filter(scope.q("group__session"), candidate__isnull=False, selector__kind=P.Kind.HUMAN)
          .exclude(decided_by__in=machine))
    return qs if include_timeouts else qs.filter(timed_out=False)


SUMMARY_CLUSTER_PATHS = {"group": "group_id", "session": "group__session_id", "selector": "selector_id"}


def _cluster_totals(*, scope: Scope, include_timeouts: bool, cluster: str) -> dict[tuple[str, int], list[tuple[int, int]]]:
    """Per condition × round, each cluster's (choices, bot choices)."""
    if cluster not in SUMMARY_CLUSTER_PATHS:
        raise ValueError(f"The cluster level must be one of {', '.join(SUMMARY_CLUSTER_PATHS)}, not {cluster!r}.")
    per_cluster = (
        counted_choices(scope=scope, include_timeouts=include_timeouts)
        .values("group__condition__name", "round_number", SUMMARY_CLUSTER_PATHS[cluster])
        .annotate(n=Count("id"), n_bot=Count("id", filter=Q(candidate__kind=P.Kind.BOT)))
        .order_by()
    )
    totals: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for row in per_cluster:
        totals.setdefault((row["group__condition__name"], row["round_number"]), []).append((row["n"], row["n_bot"]))
    return totals


def summary_rows(*, scope: Scope, include_timeouts: bool = False, cluster: str = "group") -> list[dict[str, Any]]:
    """One row per condition × round with the columns of :data:`SUMMARY_COLUMNS`; the interval of the share is
    clustered by ``cluster`` (:func:`experiment.inference.cluster_share_interval`)."""
    from experiment.inference import cluster_share_interval

    totals = _cluster_totals(scope=scope, include_timeouts=include_timeouts, cluster=cluster)
    bot, human = Q(candidate__kind=P.Kind.BOT), Q(candidate__kind=P.Kind.HUMAN)
    decided = Q(multiplied__gt=0, return_decision__isnull=False)
    ratio = Cast(F("return_decision__returned"), FloatField()) / NullIf(Cast(F("multiplied"), FloatField()), Value(0.0))
    aggregated = (
        counted_choices(scope=scope, include_timeouts=include_timeouts)
        .values("group__condition__name", "group__condition__disclose_identity", "round_number")
        .annotate(
            n_choices=Count("id"), n_bot=Count("id", filter=bot),
            mean_sent_bot=Avg("sent", filter=bot), mean_sent_human=Avg("sent", filter=human),
            mean_return_ratio_bot=Avg(ratio, filter=bot & decided), mean_return_ratio_human=Avg(ratio, filter=human & decided),
            n_returns_bot=Count("id", filter=bot & decided), n_returns_human=Count("id", filter=human & decided),
        )
        .order_by()
    )
    order = _conditions_order(scope)
    out = []
    for row in aggregated:
        share = cluster_share_interval(totals.get((row["group__condition__name"], row["round_number"]), []))
        out.append({
            "condition": row["group__condition__name"], "disclosed": row["group__condition__disclose_identity"],
            "round": row["round_number"], "n_choices": row["n_choices"], "n_bot": row["n_bot"],
            "share_bot": row["n_bot"] / row["n_choices"] if row["n_choices"] else None,
            "share_bot_low": share["low"], "share_bot_high": share["high"], "cluster": cluster,
            "n_clusters": share["n_clusters"], "design_effect": share["deff"],
            **{k: (float(row[k]) if row[k] is not None else None)
               for k in ("mean_sent_bot", "mean_sent_human", "mean_return_ratio_bot", "mean_return_ratio_human")},
            "n_returns_bot": row["n_returns_bot"], "n_returns_human": row["n_returns_human"],
        })
    out.sort(key=lambda r: (order.get(r["condition"], len(order)), r["condition"], r["round"]))
    return out


def belief_rows(*, scope: Scope, cluster: str = "group") -> list[dict[str, Any]]:
    """Belief accuracy where identity was hidden: per condition × belief round × true kind of the candidate. The
    interval of accuracy is clustered by ``cluster`` like the choice summary's (one selector's guesses, and one
    group's, are not independent)."""
    from experiment.inference import cluster_share_interval

    if cluster not in SUMMARY_CLUSTER_PATHS:
        raise ValueError(f"The cluster level must be one of {', '.join(SUMMARY_CLUSTER_PATHS)}, not {cluster!r}.")
    answered = ~Q(guess="")
    beliefs = Belief.objects.filter(scope.q("group__session"), group__condition__disclose_identity=False,
                                    selector__kind=P.Kind.HUMAN)
    key = ("group__condition__name", "round_number", "candidate__kind")
    counts = {"guessed_bot": Count("id", filter=Q(guess=Belief.Guess.BOT)),
              "guessed_human": Count("id", filter=Q(guess=Belief.Guess.HUMAN))}
    aggregated = (
        beliefs.values(*key)
        .annotate(n=Count("id"), **counts, no_guess=Count("id", filter=Q(guess="")),
                  mean_confidence=Avg("confidence", filter=answered))
        .order_by()
    )
    totals: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
    for row in beliefs.values(*key, SUMMARY_CLUSTER_PATHS[cluster]).annotate(**counts).order_by():
        right = row["guessed_bot"] if row["candidate__kind"] == P.Kind.BOT else row["guessed_human"]
        totals.setdefault(tuple(row[k] for k in key), []).append((row["guessed_bot"] + row["guessed_human"], right))
    order = _conditions_order(scope)
    out = []
    for row in aggregated:
        kind = row["candidate__kind"]
        answered_n = row["guessed_bot"] + row["guessed_human"]
        right = row["guessed_bot"] if kind == P.Kind.BOT else row["guessed_human"]
        interval = cluster_share_interval(totals.get(tuple(row[k] for k in key), []))
        low, high = interval["low"], interval["high"]
        out.append({
            "condition": row["group__condition__name"], "round": row["round_number"], "true_kind": kind, "n": row["n"],
            "guessed_bot": row["guessed_bot"], "guessed_human": row["guessed_human"], "no_guess": row["no_guess"],
            "accuracy": right / answered_n if answered_n else None, "accuracy_low": low, "accuracy_high": high,
            "misattributed": (answered_n - right) / answered_n if answered_n else None,
            "mean_confidence": float(row["mean_confidence"]) if row["mean_confidence"] is not None else None,
            "cluster": cluster, "n_clusters": interval["n_clusters"], "design_effect": interval["deff"],
        })
    out.sort(key=lambda r: (order.get(r["condition"], len(order)), r["condition"], r["round"], r["true_kind"]))
    return out


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def rows_csv(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([name for name, _ in columns])
    for row in rows:
        writer.writerow([_cell(row[name]) for name, _ in columns])
    return buffer.getvalue()


# ---- plots ----------------------------------------------------------------------------------------------

PlotFormat = Literal["png", "svg"]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"]


def _figure(title: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("Round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _render(fig: Any, fmt: PlotFormat) -> bytes:
    import matplotlib

    if fmt not in ("png", "svg"):
        raise ValueError(f'Plot format must be "png" or "svg", not "{fmt}".')
    buffer = io.BytesIO()
    # A fixed hash salt and no date: the same data always gives the same SVG bytes.
    with matplotlib.rc_context({"svg.hashsalt": "partnerlab", "svg.fonttype": "none"}):
        fig.savefig(buffer, format=fmt, dpi=120, metadata={"Date": None} if fmt == "svg" else {"Software": None})
    return buffer.getvalue()


def _by_condition(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["condition"], []).append(row)
    return out


def plot(rows: Sequence[dict[str, Any]], *, fmt: PlotFormat = "png", chance: float | None = None) -> bytes:
    """Share of choices going to bots by round, one line per condition with its 95 % (clustered) band."""
    fig, ax = _figure("Share of choices going to bot candidates", "Share to bots (95 % CI)")
    for i, (condition, series) in enumerate(_by_condition(rows).items()):
        colour = COLOURS[i % len(COLOURS)]
        xs = [r["round"] for r in series]
        ax.fill_between(xs, [r["share_bot_low"] for r in series], [r["share_bot_high"] for r in series],
                        color=colour, alpha=0.18, linewidth=0)
        ax.plot(xs, [r["share_bot"] for r in series], marker="o", color=colour, label=condition)
    if chance is not None:
        ax.axhline(chance, color="#555555", linestyle="--", linewidth=1, label="share of bot candidates")
    ax.set_ylim(0, 1)
    if rows:
        ax.legend(loc="best")
        ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        ax.text(0.5, 0.5, "No choices yet", ha="center", va="center", transform=ax.transAxes)
    return _render(fig, fmt)


def plot_returns(rows: Sequence[dict[str, Any]], *, fmt: PlotFormat = "png") -> bytes:
    """Mean return ratio by round and partner type, per condition (solid: bots, dashed: humans)."""
    fig, ax = _figure("Mean return ratio by partner type", "returned / (sent × multiplier)")
    for i, (condition, series) in enumerate(_by_condition(rows).items()):
        colour = COLOURS[i % len(COLOURS)]
        xs = [r["round"] for r in series]
        ax.plot(xs, [r["mean_return_ratio_bot"] for r in series], marker="o", color=colour, label=f"{condition}: bots")
        ax.plot(xs, [r["mean_return_ratio_human"] for r in series], marker="s", linestyle="--", color=colour,
                label=f"{condition}: humans")
    ax.set_ylim(0, 1)
    if rows:
        ax.legend(loc="best", fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _render(fig, fmt)


def bot_share_of_candidates(*, scope: Scope) -> float | None:
    """The share a selector choosing at random would give bots (when the designs in scope agree)."""
    shares = {(c.n_bot_candidates, c.n_candidates) for c in _experiments(scope)}
    if len(shares) != 1:
        return None
    bots, total = shares.pop()
    return bots / total if total else None


def _experiments(scope: Scope) -> list[Any]:
    from experiment.models import Experiment

    return list(Experiment.objects.filter(scope.q("sessions")).distinct())


# ---- regression ---------------------------------------------------------------------------------------

Cluster = Literal["group", "session", "selector"]
Inference = Literal["auto", "cr2", "bootstrap", "crve"]
CLUSTERS: dict[str, str] = {"group": "group_id", "session": "session_id", "selector": "selector_id"}
INFERENCES = ("auto", "cr2", "bootstrap", "crve")
# Below this many clusters ``auto`` uses CR2 with Bell–McCaffrey degrees of freedom: ordinary cluster-robust
# errors are known to be too small with few clusters (Cameron & Miller 2015 put the danger zone at a few dozen).
# Why CR2 rather than the score bootstrap (still available as ``bootstrap``): in the same 2,000 simulated studies
# under a planted null, the bootstrap rejected 5.9 % at 10 groups and CR2 5.0 % (docs/analysis.md).
FEW_CLUSTERS = 50
BOOTSTRAP_DRAWS = 9999
BOOTSTRAP_SEED = 20250718  # fixed: the same data always give the same report


@dataclass
class Slope:
    condition: str
    estimate: float
    se: float
    low: float
    high: float
    p: float
    df: float = math.nan  # the reference t distribution's degrees of freedom (nan for the bootstrap)

    @property
    def odds_ratio(self) -> float:
        return math.exp(self.estimate)


@dataclass
class Regression:
    """Logit of choosing a bot on round × condition, inference clustered at ``cluster`` by ``method``."""

    formula: str = ""
    n: int = 0
    n_selectors: int = 0
    n_groups: int = 0
    cluster: str = "group"
    n_clusters: int = 0
    method: str = ""
    method_text: str = ""
    draws: int = 0
    seed: int = 0
    reference: str = ""
    coefficients: list[dict[str, Any]] = field(default_factory=list)
    slopes: list[Slope] = field(default_factory=list)
    differences: list[Slope] = field(default_factory=list)
    predicted: dict[str, tuple[float, float, int, int]] = field(default_factory=dict)
    mixed: dict[str, Any] = field(default_factory=dict)
    reading: list[str] = field(default_factory=list)
    text: str = ""
    error: str = ""
    # What :meth:`test` needs: the design's columns, the estimates, the clustered covariance, the bootstrap.
    columns: list[str] = field(default_factory=list, repr=False)
    params: Any = field(default=None, repr=False)
    cov: Any = field(default=None, repr=False)
    bootstrap: Any = field(default=None, repr=False)
    cr2: Any = field(default=None, repr=False)

    COEFFICIENT_COLUMNS = ("term", "estimate", "se", "df", "p", "low", "high", "odds_ratio", "cluster", "n_clusters",
                           "method")

    def coefficients_csv(self) -> str:
        return rows_csv(self.coefficients, [(k, k) for k in self.COEFFICIENT_COLUMNS])

    def weights(self, combination: Mapping[str, float]) -> Any:
        import numpy as np

        unknown = set(combination) - set(self.columns)
        if unknown:
            raise ValueError(f"Unknown term(s) {', '.join(sorted(unknown))}; the terms are {', '.join(self.columns)}.")
        return np.array([float(combination.get(t, 0.0)) for t in self.columns])

    def estimate(self, combination: Mapping[str, float]) -> tuple[float, float]:
        """Point estimate and cluster-robust (CR1) standard error of a linear combination of terms."""
        w = self.weights(combination)
        return float(w @ self.params), float(math.sqrt(max(float(w @ self.cov @ w), 0.0)))

    def test(self, combination: Mapping[str, float], value: float = 0.0) -> float:
        """Two-sided p-value of H0: combination · β = value by the declared method."""
        if self.method == "score-bootstrap":
            return self.bootstrap.test(self.weights(combination), value).p
        from experiment.inference import crve_test

        estimate, se = self.estimate(combination)
        if self.method == "cr2":
            return self.cr2.test(self.weights(combination), estimate=estimate, value=value)[0]
        return crve_test(estimate=estimate, se=se, n_clusters=self.n_clusters, value=value)[0]

    def slope_of(self, combination: Mapping[str, float], name: str, *, interval: bool = True) -> Slope:
        """The combination's estimate, the standard error of the declared method (CR2 for ``cr2``, CR1
        otherwise), and its p-value and 95 % interval by that method."""
        from experiment.inference import crve_test

        estimate, se = self.estimate(combination)
        df = float(self.n_clusters - 1)
        if self.method == "score-bootstrap":
            df = math.nan
            p = self.bootstrap.test(self.weights(combination), 0.0).p
            low, high = (self.bootstrap.interval(self.weights(combination), estimate=estimate, scale=se)
                         if interval else (math.nan, math.nan))
        elif self.method == "cr2":
            se, df = self.cr2.contrast(self.weights(combination))
            p, low, high = self.cr2.test(self.weights(combination), estimate=estimate)
        else:
            p, low, high = crve_test(estimate=estimate, se=se, n_clusters=self.n_clusters)
        return Slope(condition=name, estimate=estimate, se=se, low=low, high=high, p=p, df=df)


def choice_frame(*, scope: Scope, include_timeouts: bool = False) -> Any:
    """Choice-level data for modelling (a pandas DataFrame): bot (0/1), round, condition, selector_id,
    group_id, session_id — the same columns a researcher gets from the ``choices`` export."""
    import pandas as pd

    values = (counted_choices(scope=scope, include_timeouts=include_timeouts)
              .values_list("candidate__kind", "round_number", "group__condition__name", "selector_id", "group_id",
                           "group__session_id")
              .order_by("id"))
    frame = pd.DataFrame.from_records(list(values.iterator(chunk_size=5000)),
                                      columns=["kind", "round", "condition", "selector_id", "group_id", "session_id"])
    frame["bot"] = (frame["kind"] == P.Kind.BOT).astype(int)
    return frame.drop(columns=["kind"])[["bot", "round", "condition", "selector_id", "group_id", "session_id"]]


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _percent(x: float) -> str:
    return f"{100 * x:.0f} %"


def regression(*, scope: Scope, include_timeouts: bool = False, cluster: str = "group",
               inference: str = "auto") -> Regression:
    """Fit ``bot ~ (round − 1) × condition`` (logit), inference clustered at ``cluster``."""
    frame = choice_frame(scope=scope, include_timeouts=include_timeouts)
    return fit_regression(frame=frame, conditions_order=_conditions_order(scope), cluster=cluster, inference=inference)


def check_inference(*, cluster: str, inference: str) -> None:
    if cluster not in CLUSTERS:
        raise ValueError(f"The cluster level must be one of {', '.join(CLUSTERS)}, not {cluster!r}.")
    if inference not in INFERENCES:
        raise ValueError(f"The inference method must be one of {', '.join(INFERENCES)}, not {inference!r}.")


def _method_text(result: Regression, inference: str) -> str:
    unit = {"group": "group (mini-society)", "session": "session", "selector": "selector"}[result.cluster]
    why = {"group": "the selectors of one group see the same candidates and the same bots, so their choices are "
                    "not independent; the group is the unit of independent replication",
           "session": "groups of one session share a time slot and a recruitment wave",
           "selector": "this treats the groups' selectors as independent of one another, which the game does not "
                       "guarantee (they see the same candidates): use it as a sensitivity check only"}[result.cluster]
    text = f"Inference is clustered by {unit} ({result.n_clusters} clusters): {why}."
    if result.method == "cr2":
        reason = (f"with fewer than {FEW_CLUSTERS} clusters ordinary cluster-robust standard errors are too small"
                  if inference == "auto" else "as asked")
        text += (f" Standard errors, p-values and 95 % intervals use the bias-reduced cluster-robust variance CR2 "
                 f"({reason}; Bell & McCaffrey) with Student's t on the Bell–McCaffrey degrees of freedom, which are "
                 f"computed from the design for each coefficient and are at most G − 1 = {result.n_clusters - 1}.")
    elif result.method == "score-bootstrap":
        reason = (f"with fewer than {FEW_CLUSTERS} clusters ordinary cluster-robust standard errors are too small"
                  if inference == "auto" else "as asked")
        text += (f" P-values and 95 % intervals come from a wild cluster score bootstrap ({reason}): Kline & Santos's "
                 f"score bootstrap for the logit, Webb six-point weights, the null hypothesis imposed, {result.draws} "
                 f"draws (seed {result.seed}); intervals by inverting the test. Standard errors shown are the "
                 "cluster-robust (CR1) ones, for reference.")
    else:
        reason = (f"with {FEW_CLUSTERS} or more clusters they are reliable" if inference == "auto" else "as asked")
        text += (f" P-values and 95 % intervals use cluster-robust (CR1) standard errors ({reason}) with Student's t on "
                 f"{result.n_clusters - 1} degrees of freedom (G − 1).")
    return text


def fit_regression(*, frame: Any, conditions_order: Mapping[str, int] | None = None, describe: bool = True,
                   cluster: str = "group", inference: str = "auto", draws: int = BOOTSTRAP_DRAWS,
                   seed: int = BOOTSTRAP_SEED, intervals: bool = True, mixed: bool | None = None) -> Regression:
    """:func:`regression` on a frame shaped like :func:`choice_frame` (in memory: ``manage.py power`` fits
    simulated choices with it). ``conditions_order``: condition → rank, the reference arm is "hidden" when
    present, else the first; ``describe=False`` skips the plain-words reading and the statsmodels summary;
    ``intervals=False`` skips the bootstrap intervals (p-values and :meth:`Regression.test` still work);
    ``mixed``: also fit the mixed-effects logit (default: when describing)."""
    import warnings

    import numpy as np
    import pandas as pd
    import statsmodels.api as sm

    from experiment.inference import CR2, ScoreBootstrap

    check_inference(cluster=cluster, inference=inference)
    column = CLUSTERS[cluster]
    result = Regression(n=len(frame), cluster=cluster)
    if column not in frame.columns:
        result.error = f"The data have no {column} column, so inference cannot be clustered by {cluster}."
        return result
    if len(frame):
        result.n_selectors = int(frame["selector_id"].nunique())
        result.n_groups = int(frame["group_id"].nunique()) if "group_id" in frame.columns else 0
        result.n_clusters = int(frame[column].nunique())
    if len(frame) == 0:
        result.error = "No choices to model yet."
        return result
    if frame["round"].nunique() < 2:
        result.error = "Choices from at least two rounds are needed to estimate a change across rounds."
        return result
    if frame["bot"].nunique() < 2:
        result.error = ("Every counted choice went to the same kind of candidate, so the odds cannot be estimated "
                        f"(all {'bots' if frame['bot'].iloc[0] else 'humans'}).")
        return result
    if result.n_clusters < 2:
        result.error = (f"Inference clustered by {cluster} needs at least two {cluster}s; these data have "
                        f"{result.n_clusters}. Choose a finer cluster level (--cluster group) or collect more.")
        return result

    order = dict(conditions_order or {})
    conditions = sorted(frame["condition"].unique(), key=lambda c: (order.get(c, len(order)), c))
    reference = REFERENCE_CONDITION if REFERENCE_CONDITION in conditions else conditions[0]
    others = [c for c in conditions if c != reference]
    result.reference = reference
    # Round counted from 0 at round 1: the intercept is the log-odds in the first round of the reference arm.
    r0 = frame["round"] - frame["round"].min()
    design = pd.DataFrame({"const": 1.0, "round": r0.astype(float)})
    for c in others:
        is_c = (frame["condition"] == c).astype(float)
        design[c] = is_c
        design[f"round:{c}"] = r0 * is_c
    terms = " + ".join(["round", *others, *(f"round:{c}" for c in others)])
    result.formula = f"logit P(bot) = const + {terms}  (round counted from 0 at round {int(frame['round'].min())}; "  \
                     f"reference condition: {reference})"
    result.columns = list(design.columns)

    codes = pd.factorize(frame[column])[0]
    thin = [c for c in conditions if frame.loc[frame["condition"] == c, "round"].nunique() < 2]
    if thin:
        result.error = (f"Condition {', '.join(thin)} has choices from a single round so far: its change across rounds "
                        "cannot be estimated yet.")
        return result
    try:
        with warnings.catch_warnings():
            from statsmodels.tools.sm_exceptions import ModelWarning

            # Separation, a singular design, no convergence: each makes the estimates meaningless, so each fails.
            warnings.simplefilter("error", category=RuntimeWarning)
            warnings.simplefilter("error", category=ModelWarning)
            fit = sm.GLM(frame["bot"].astype(float), design, family=sm.families.Binomial()).fit(
                cov_type="cluster", cov_kwds={"groups": codes})
    except Exception as exc:  # statsmodels signals separation and singular designs in several ways
        result.error = f"The model could not be fitted: {exc}"
        return result
    if not np.all(np.isfinite(fit.bse)):
        result.error = (f"Standard errors clustered by {cluster} cannot be estimated from these {result.n_clusters} "
                        "clusters (too few, or too little variation within them).")
        return result
    result.params = np.asarray(fit.params, dtype=float)
    result.cov = np.asarray(fit.cov_params(), dtype=float)
    few = result.n_clusters < FEW_CLUSTERS
    use_bootstrap = inference == "bootstrap"
    result.method = "score-bootstrap" if use_bootstrap else "cr2" if inference == "cr2" or (
        inference == "auto" and few) else "crve"
    if result.method == "cr2":
        try:
            result.cr2 = CR2.logit(design=design.to_numpy(), y=frame["bot"].to_numpy(), beta=result.params,
                                   clusters=codes)
        except np.linalg.LinAlgError as exc:
            result.error = f"The CR2 variance could not be computed from these clusters: {exc}"
            return result
    if use_bootstrap:
        result.draws, result.seed = draws, seed
        result.bootstrap = ScoreBootstrap(design=design.to_numpy(), y=frame["bot"].to_numpy(), clusters=codes,
                                          draws=draws, seed=seed)
    result.method_text = _method_text(result, inference)

    try:
        for term in design.columns:
            s = result.slope_of({term: 1.0}, term, interval=intervals)
            result.coefficients.append({
                "term": term, "estimate": s.estimate, "se": s.se, "df": s.df, "p": s.p, "low": s.low, "high": s.high,
                "odds_ratio": s.odds_ratio, "cluster": cluster, "n_clusters": result.n_clusters, "method": result.method,
            })
        by_term = {c["term"]: c for c in result.coefficients}

        def from_term(term: str, name: str) -> Slope:
            c = by_term[term]
            return Slope(condition=name, estimate=c["estimate"], se=c["se"], low=c["low"], high=c["high"], p=c["p"],
                         df=c["df"])

        result.slopes.append(from_term("round", reference))
        for c in others:
            result.slopes.append(result.slope_of({"round": 1.0, f"round:{c}": 1.0}, c, interval=intervals))
            result.differences.append(from_term(f"round:{c}", c))
    except Exception as exc:  # a restricted fit that does not converge: say so rather than report nonsense
        result.error = f"The {result.method} inference failed on these data: {exc}"
        return result

    bounds = [x for s in result.slopes + result.differences for x in (s.low, s.high)] if intervals else []
    if not all(math.isfinite(s.estimate) for s in result.slopes + result.differences) or any(math.isnan(x) for x in bounds):
        result.error = (f"Standard errors clustered by {cluster} cannot be estimated from these {result.n_clusters} "
                        "clusters (too few, or too little variation within them).")
        return result
    first, last = int(frame["round"].min()), int(frame["round"].max())
    for c in conditions:
        row0 = {"const": 1.0, "round": 0.0}
        row1 = {"const": 1.0, "round": float(last - first)}
        if c != reference:
            row0 |= {c: 1.0}
            row1 |= {c: 1.0, f"round:{c}": float(last - first)}
        logit = [sum(fit.params[t] * v for t, v in row.items()) for row in (row0, row1)]
        result.predicted[c] = (1 / (1 + math.exp(-logit[0])), 1 / (1 + math.exp(-logit[1])), first, last)
    if mixed if mixed is not None else describe:
        result.mixed = fit_mixed(frame=frame, design=design, reference=reference, others=others)
    if describe:
        result.reading = _reading(result)
        result.text = str(fit.summary())
    return result


def fit_mixed(*, frame: Any, design: Any, reference: str, others: Sequence[str]) -> dict[str, Any]:
    """The robustness line: a mixed-effects logit with random intercepts for groups and for selectors (within
    groups: selector ids are unique across groups), fitted with statsmodels' BinomialBayesMixedGLM by
    variational Bayes. Its slopes are conditional on a group and a selector (subject-specific), so they are
    larger in magnitude than the population-averaged ones of the main logit when the random effects are large;
    the variational posterior is known to understate uncertainty somewhat. Returns {} on failure (with the
    reason under "error")."""
    import warnings

    import numpy as np
    import pandas as pd
    from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM

    if "group_id" not in frame.columns:
        return {"error": "no group_id column"}
    groups = pd.factorize(frame["group_id"])[0]
    selectors = pd.factorize(frame["selector_id"])[0]
    # Random-effect design: one indicator column per group, then one per selector; two variance components.
    from scipy import sparse

    rows = np.r_[np.arange(len(frame)), np.arange(len(frame))]
    exog_vc = sparse.csr_matrix((np.ones(2 * len(frame)), (rows, np.r_[groups, groups.max() + 1 + selectors])),
                                shape=(len(frame), groups.max() + 1 + selectors.max() + 1))
    ident = np.r_[np.zeros(groups.max() + 1, dtype=int), np.ones(selectors.max() + 1, dtype=int)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = BinomialBayesMixedGLM(frame["bot"].to_numpy(dtype=float), design.to_numpy(), exog_vc, ident,
                                          fep_names=list(design.columns), vcp_names=["group", "selector"])
            fit = model.fit_vb()
    except Exception as exc:  # the robustness line must not take the report down with it
        return {"error": f"the mixed-effects logit could not be fitted: {exc}"}
    mean, sd = np.asarray(fit.fe_mean), np.asarray(fit.fe_sd)
    columns = list(design.columns)
    rows = []
    for term in columns:
        i = columns.index(term)
        rows.append({"term": term, "estimate": float(mean[i]), "sd": float(sd[i]),
                     "low": float(mean[i] - Z95 * sd[i]), "high": float(mean[i] + Z95 * sd[i])})
    return {"coefficients": rows,
            # vcp_mean is the posterior mean of log(SD) of each variance component.
            "sd_group": float(np.exp(fit.vcp_mean[0])), "sd_selector": float(np.exp(fit.vcp_mean[1])),
            "method": "statsmodels BinomialBayesMixedGLM, variational Bayes (fit_vb): random intercepts for group and "
                      "for selector within group; 95 % intervals are posterior mean ± 1.96 posterior SD"}


def _reading(result: Regression) -> list[str]:
    lines = [f"Based on {result.n} choices by {result.n_selectors} human selectors in {result.n_groups} groups. "
             + result.method_text]
    for slope in result.slopes:
        p0, p1, first, last = result.predicted[slope.condition]
        per_round = (p1 - p0) / (last - first) if last > first else 0.0
        factor = f"{slope.odds_ratio:.2f} (95 % CI {math.exp(slope.low):.2f} to {math.exp(slope.high):.2f}; {_p_text(slope.p)})"
        if slope.low > 0:
            trend = "rose"
        elif slope.high < 0:
            trend = "fell"
        else:
            trend = None
        if trend:
            lines.append(f"In the {slope.condition} condition, the odds of choosing a bot {trend} across rounds: they were "
                         f"multiplied by {factor} per round. The fitted share of bot choices goes from {_percent(p0)} in "
                         f"round {first} to {_percent(p1)} in round {last}, about {100 * per_round:+.1f} percentage points "
                         "per round.")
        else:
            lines.append(f"In the {slope.condition} condition, there is no clear trend: the odds of choosing a bot were "
                         f"multiplied by {factor} per round, an interval that includes no change. The fitted share "
                         f"goes from {_percent(p0)} in round {first} to {_percent(p1)} in round {last}.")
    for diff in result.differences:
        verdict = ("differs clearly from" if diff.low > 0 or diff.high < 0 else "is not clearly different from")
        lines.append(f"The trend in the {diff.condition} condition {verdict} the trend in the {result.reference} "
                     f"condition: the difference is {diff.estimate:+.3f} log-odds per round (95 % CI {diff.low:+.3f} to "
                     f"{diff.high:+.3f}; {_p_text(diff.p)}).")
    mixed = {c["term"]: c for c in result.mixed.get("coefficients", [])}
    for diff in result.differences:
        m = mixed.get(f"round:{diff.condition}")
        if m:
            lines.append(f"Robustness: a mixed-effects logit with random intercepts for groups and selectors gives "
                         f"{m['estimate']:+.3f} log-odds per round for the same difference (95 % interval "
                         f"{m['low']:+.3f} to {m['high']:+.3f}; estimated SD of the group intercepts "
                         f"{result.mixed['sd_group']:.2f}, of the selector intercepts {result.mixed['sd_selector']:.2f}).")
    if result.mixed.get("error"):
        lines.append(f"Robustness: {result.mixed['error']}.")
    return lines


# ---- the report -----------------------------------------------------------------------------------------

def _svg_inline(data: bytes) -> str:
    text = data.decode()
    # Drop the XML declaration and DOCTYPE so the SVG can sit inside HTML.
    return re.sub(r"^.*?(<svg\b)", r"\1", text, count=1, flags=re.DOTALL)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


ADAPTATION_TABLES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # section: (title, the column saying whose measures these are, the measures)
    "candidates": ("Candidate seats: return responsiveness and pitch change", "kind", adaptation.CANDIDATE_MEASURES),
    "selectors": ("Selector seats: staying with partners who return more", "kind", adaptation.SELECTOR_MEASURES),
    "groups": ("Groups: concentration and persistence of choices (settled rounds)", "selector_kind",
               adaptation.GROUP_MEASURES),
}


def adaptation_context(*, scope: Scope) -> dict[str, Any]:
    """The report's "Adaptation" section: per arm and kind, the mean of each per-unit measure of
    :mod:`experiment.adaptation` with the number of units it is defined for, as (header, rows) per section."""
    summary = adaptation.summary(scope, conditions_order=_conditions_order(scope))
    out: dict[str, Any] = {"sections": []}
    for section, (title, who, measures) in ADAPTATION_TABLES.items():
        out[section] = [[r["condition"], r[who], r["n"], *(f"{_fmt(r[m])} ({r[f'n_{m}']})" for m in measures)]
                        for r in summary[section]]
        out["sections"].append({"title": title, "headers": ["condition", who, "n", *measures], "rows": out[section]})
    keys = ("estimate", "se", "df", "low", "high", "p")
    out["pooled"] = [[r["condition"], r["kind"], r["slope"], *(_fmt(r[k]) for k in keys), r["n"], r["n_clusters"],
                      r["error"]] for r in summary["pooled"]]
    out["sections"].append({
        "title": "Pooled slopes by arm and kind (OLS with an intercept; SE CR2 clustered by group, 95 % CI on "
                 "Student's t with Bell–McCaffrey df)",
        "headers": ["condition", "kind", "slope of", *keys, "n", "groups", "why empty"], "rows": out["pooled"]})
    return out


def report_context(*, scope: Scope, title: str, include_timeouts: bool = False, cluster: str = "group",
                   inference: str = "auto") -> dict[str, Any]:
    summary = summary_rows(scope=scope, include_timeouts=include_timeouts, cluster=cluster)
    beliefs = belief_rows(scope=scope, cluster=cluster)
    chance = bot_share_of_candidates(scope=scope)
    fit = regression(scope=scope, include_timeouts=include_timeouts, cluster=cluster, inference=inference)
    return {
        "title": title,
        "generated_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "scope": scope,
        "include_timeouts": include_timeouts,
        "summary_columns": SUMMARY_COLUMNS,
        "summary": [[_fmt(r[name]) for name, _ in SUMMARY_COLUMNS] for r in summary],
        "belief_columns": BELIEF_COLUMNS,
        "beliefs": [[_fmt(r[name]) for name, _ in BELIEF_COLUMNS] for r in beliefs],
        "share_plot_svg": _svg_inline(plot(summary, fmt="svg", chance=chance)),
        "returns_plot_svg": _svg_inline(plot_returns(summary, fmt="svg")),
        "regression": fit,
        "se_label": "CR2" if fit.method == "cr2" else "CR1",
        "coefficients": [[c["term"], *(_fmt(c[k]) for k in ("estimate", "se", "df", "p", "low", "high", "odds_ratio"))]
                         for c in fit.coefficients],
        "mixed": [[c["term"], *(_fmt(c[k]) for k in ("estimate", "sd", "low", "high"))]
                  for c in fit.mixed.get("coefficients", [])],
        "slopes": [[s.condition, _fmt(s.estimate), _fmt(s.se), _fmt(s.df), _fmt(s.low), _fmt(s.high),
                    _fmt(s.odds_ratio), _fmt(s.p)] for s in fit.slopes],
        "adaptation": adaptation_context(scope=scope),
        "raw": {"summary": summary, "beliefs": beliefs},
    }


def report_html(*, scope: Scope, title: str, include_timeouts: bool = False, cluster: str = "group",
                inference: str = "auto") -> str:
    """A self-contained HTML report: summary, plots (inline SVG), belief accuracy, regression and its reading."""
    context = report_context(scope=scope, title=title, include_timeouts=include_timeouts, cluster=cluster,
                             inference=inference)
    return render_to_string("experiment/staff/report.html", context)
