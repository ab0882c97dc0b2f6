"""The preference-shift analysis recovers a planted effect, and its outputs (CSV, plots, report) are sound.

Planted data: in the disclosed condition the log-odds of choosing a bot rise by SLOPE per round; in the
hidden condition they do not change. Bots return 2/3 of what they receive and humans 1/3, exactly.
"""

from __future__ import annotations

import csv
import io
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from experiment import analysis
from experiment.export import Scope
from experiment.models import Belief, Choice, Group, Participant, Return, Session
from tests import factories

pytestmark = pytest.mark.django_db

P = Participant
ROUNDS = 10
GROUPS_PER_CONDITION = 50  # × 3 selectors = 150 selector clusters per condition
SLOPE = 0.3  # planted change in log-odds per round, disclosed condition
INTERCEPT = {"hidden": 0.0, "disclosed": -1.5}
TRUE_SLOPE = {"hidden": 0.0, "disclosed": SLOPE}


def true_share(condition: str, round_number: int) -> float:
    return 1 / (1 + math.exp(-(INTERCEPT[condition] + TRUE_SLOPE[condition] * (round_number - 1))))


# A fixed seed makes the test reproducible. A 95 % interval misses the truth for about 1 seed in 20
# (seed 20250717 is such a draw for the disclosed slope); the assertions below are not tuned to this seed.
SEED = 1


def plant(*, seed: int = SEED) -> Session:
    """A finished session built directly in the database with a known data-generating process."""
    rng = random.Random(seed)
    experiment = factories.experiment_create(n_rounds=ROUNDS)
    session = factories.session_create(experiment)
    conditions = {c.name: c for c in experiment.conditions.all()}
    groups = Group.objects.bulk_create([
        Group(session=session, condition=conditions[name], number=i * 2 + k + 1, status=Group.Status.FINISHED,
              round_number=ROUNDS, phase="feedback")
        for i in range(GROUPS_PER_CONDITION) for k, name in enumerate(("hidden", "disclosed"))])
    people = []
    for g in groups:
        kinds = ["bot", "bot", "human", "human"]
        rng.shuffle(kinds)
        people += [Participant(session=session, group=g, role=P.Role.SELECTOR, seat=f"S{j}", kind=P.Kind.HUMAN,
                               status=P.Status.FINISHED) for j in (1, 2, 3)]
        people += [Participant(session=session, group=g, role=P.Role.CANDIDATE, seat=seat, kind=kind,
                               controller=P.Controller.SCRIPTED if kind == "bot" else P.Controller.PERSON,
                               status=P.Status.FINISHED) for seat, kind in zip("ABCD", kinds, strict=True)]
    Participant.objects.bulk_create(people)
    by_group: dict[int, list[Participant]] = {}
    for p in Participant.objects.filter(session=session).order_by("seat"):
        by_group.setdefault(p.group_id, []).append(p)
    choices = []
    for g in groups:
        seats = by_group[g.pk]
        bots = [p for p in seats if p.role == "candidate" and p.kind == "bot"]
        humans = [p for p in seats if p.role == "candidate" and p.kind == "human"]
        disclosed = g.condition.disclose_identity
        for r in range(1, ROUNDS + 1):
            for s in (p for p in seats if p.role == "selector"):
                to_bot = rng.random() < true_share(g.condition.name, r)
                chosen = rng.choice(bots if to_bot else humans)
                sent = rng.randint(1, 10)
                order = ["A", "B", "C", "D"]
                rng.shuffle(order)
                choices.append(Choice(group=g, round_number=r, selector=s, candidate=chosen, sent=sent,
                                      multiplied=3 * sent, order=order, position=order.index(chosen.seat) + 1,
                                      label_shown=("AI bot" if to_bot else "Human") if disclosed else ""))
    # Timed-out defaults all go to bots: they must not count unless asked for.
    for g in groups[:4]:
        seats = by_group[g.pk]
        bot = next(p for p in seats if p.kind == "bot")
        extra = next(p for p in seats if p.role == "selector")
        choices = [c for c in choices if not (c.group_id == g.pk and c.selector_id == extra.pk and c.round_number == 1)]
        choices.append(Choice(group=g, round_number=1, selector=extra, candidate=bot, sent=0, multiplied=0, order=[],
                              position=1, timed_out=True))
    Choice.objects.bulk_create(choices, batch_size=2000)
    Return.objects.bulk_create([
        Return(choice=c, candidate=c.candidate, available=c.multiplied,
               returned=2 * c.sent if c.candidate.kind == "bot" else c.sent)
        for c in Choice.objects.filter(group__session=session).select_related("candidate")], batch_size=2000)
    # Beliefs in the last round of the hidden groups: selectors S1 judge everyone "human", S2 everyone "bot".
    beliefs = []
    for g in groups:
        if g.condition.name != "hidden":
            continue
        seats = by_group[g.pk]
        for s in (p for p in seats if p.seat in ("S1", "S2")):
            for c in (p for p in seats if p.role == "candidate"):
                beliefs.append(Belief(group=g, round_number=ROUNDS, selector=s, candidate=c,
                                      guess="human" if s.seat == "S1" else "bot", confidence=70))
    Belief.objects.bulk_create(beliefs)
    return session


@pytest.fixture
def planted() -> Session:
    return plant()


def test_wilson_interval_known_values() -> None:
    low, high = analysis.wilson(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = analysis.wilson(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    assert analysis.wilson(0, 0) == (None, None)


def test_summary_recovers_planted_shares(planted: Session) -> None:
    rows = analysis.summary_rows(scope=Scope.session(planted.pk))
    assert [(r["condition"], r["round"]) for r in rows] == [(c, r) for c in ("hidden", "disclosed") for r in range(1, ROUNDS + 1)]
    per_cell = 3 * GROUPS_PER_CONDITION
    covered = 0
    for row in rows:
        # Two groups per condition had their first selector's round-1 choice replaced by a deadline default.
        assert row["n_choices"] == per_cell - (2 if row["round"] == 1 else 0)
        assert row["n_choices"] == Choice.objects.filter(
            group__session=planted, group__condition__name=row["condition"], round_number=row["round"], timed_out=False).count()
        assert row["share_bot"] == pytest.approx(row["n_bot"] / row["n_choices"])
        assert row["share_bot_low"] <= row["share_bot"] <= row["share_bot_high"]
        # Clustered by group: 50 groups per condition; selectors choose independently here, so little design effect.
        assert row["cluster"] == "group" and row["n_clusters"] == GROUPS_PER_CONDITION
        assert 1.0 <= row["design_effect"] < 2.0
        covered += row["share_bot_low"] <= true_share(row["condition"], row["round"]) <= row["share_bot_high"]
        # Exactly planted return ratios: bots 2/3, humans 1/3.
        assert row["mean_return_ratio_bot"] == pytest.approx(2 / 3)
        assert row["mean_return_ratio_human"] == pytest.approx(1 / 3)
        assert 1 <= row["mean_sent_bot"] <= 10 and 1 <= row["mean_sent_human"] <= 10
    # 95 % intervals: with 20 cells, at most a few may miss the truth.
    assert covered >= 17, covered
    by = {(r["condition"], r["round"]): r["share_bot"] for r in rows}
    rise = by[("disclosed", ROUNDS)] - by[("disclosed", 1)]
    assert rise == pytest.approx(true_share("disclosed", ROUNDS) - true_share("disclosed", 1), abs=0.2)
    assert abs(by[("hidden", ROUNDS)] - by[("hidden", 1)]) < 0.2


def test_timeouts_left_out_unless_asked(planted: Session) -> None:
    scope = Scope.session(planted.pk)
    without = {(r["condition"], r["round"]): r["n_choices"] for r in analysis.summary_rows(scope=scope)}
    with_ = {(r["condition"], r["round"]): r["n_choices"] for r in analysis.summary_rows(scope=scope, include_timeouts=True)}
    timed_out = Choice.objects.filter(group__session=planted, timed_out=True).count()
    assert timed_out == 4
    assert sum(with_.values()) - sum(without.values()) == timed_out


def test_regression_recovers_planted_slopes(planted: Session) -> None:
    fit = analysis.regression(scope=Scope.session(planted.pk))
    assert not fit.error
    assert fit.reference == "hidden"
    assert fit.n == Choice.objects.filter(group__session=planted, timed_out=False).count()
    assert fit.n_selectors == 2 * 3 * GROUPS_PER_CONDITION
    slopes = {s.condition: s for s in fit.slopes}
    for condition, truth in TRUE_SLOPE.items():
        s = slopes[condition]
        assert s.low < truth < s.high, (condition, s)
        assert s.high - s.low < 0.25  # informative, not a trivially wide interval
    # The disclosed trend is clearly positive; the hidden one is not clearly anything.
    assert slopes["disclosed"].low > 0
    (difference,) = fit.differences
    assert difference.low < SLOPE < difference.high and difference.low > 0
    terms = {c["term"]: c for c in fit.coefficients}
    assert set(terms) == {"const", "round", "disclosed", "round:disclosed"}
    assert terms["const"]["low"] < INTERCEPT["hidden"] < terms["const"]["high"]
    reading = " ".join(fit.reading)
    assert "disclosed condition, the odds of choosing a bot rose" in reading
    assert "hidden condition, there is no clear trend" in reading
    assert "differs clearly" in reading
    # Fitted shares at the first and last round match the truth.
    p0, p1, first, last = fit.predicted["disclosed"]
    assert (first, last) == (1, ROUNDS)
    assert p0 == pytest.approx(true_share("disclosed", 1), abs=0.08)
    assert p1 == pytest.approx(true_share("disclosed", ROUNDS), abs=0.08)


def test_standard_errors_are_clustered_by_group_by_default(planted: Session) -> None:
    """Same point estimates as an ordinary logit of the same design; standard errors clustered by group, and with
    100 groups (50 or more) cluster-robust errors with t(G − 1), not the bootstrap."""
    import statsmodels.api as sm

    frame = analysis.choice_frame(scope=Scope.session(planted.pk))
    fit = analysis.regression(scope=Scope.session(planted.pk))
    assert (fit.cluster, fit.n_clusters, fit.n_groups, fit.method) == ("group", 2 * GROUPS_PER_CONDITION,
                                                                        2 * GROUPS_PER_CONDITION, "crve")
    design = frame.assign(const=1.0, r=frame["round"] - 1)
    x = design[["const", "r"]].assign(d=(frame["condition"] == "disclosed").astype(float),
                                      rd=(frame["round"] - 1) * (frame["condition"] == "disclosed"))
    by_group = sm.GLM(design["bot"], x, family=sm.families.Binomial()).fit(
        cov_type="cluster", cov_kwds={"groups": frame["group_id"].to_numpy()})
    terms = {c["term"]: c for c in fit.coefficients}
    assert terms["round"]["estimate"] == pytest.approx(by_group.params["r"], rel=1e-6)
    assert terms["round:disclosed"]["se"] == pytest.approx(by_group.bse["rd"], rel=1e-6)
    assert {c["cluster"] for c in fit.coefficients} == {"group"} and {c["method"] for c in fit.coefficients} == {"crve"}
    # (The mixed-effects line is the same whatever the cluster level: skipped here, it is the slow part.)
    by_selector = analysis.fit_regression(frame=frame, cluster="selector", mixed=False)
    assert by_selector.n_clusters == 2 * 3 * GROUPS_PER_CONDITION
    assert by_selector.coefficients[1]["se"] != pytest.approx(terms["round"]["se"], rel=1e-3)
    one_session = analysis.fit_regression(frame=frame, cluster="session", mixed=False)
    assert "needs at least two sessions" in one_session.error
    with pytest.raises(ValueError, match="cluster level must be one of group, session, selector"):
        analysis.regression(scope=Scope.session(planted.pk), cluster="nonsense")


def test_few_groups_use_cr2_with_bell_mccaffrey_degrees_of_freedom_and_say_so(planted: Session) -> None:
    """With 16 groups the default is CR2 with Student's t on the Bell–McCaffrey degrees of freedom: the interval is
    estimate ± t(df) × CR2 error, the degrees of freedom are below G − 1, and the reading says which unit and method.
    (Whether such intervals cover the truth 95 % of the time is a property over many studies, measured by
    ``manage.py power`` in docs/analysis.md, not of this one draw.)"""
    from scipy import stats

    Group.objects.filter(session=planted, number__gt=16).delete()
    scope = Scope.session(planted.pk)
    fit = analysis.fit_regression(frame=analysis.choice_frame(scope=scope))
    assert not fit.error and (fit.n_clusters, fit.method) == (16, "cr2")
    (difference,) = fit.differences
    assert 1 < difference.df < 15
    half = stats.t.ppf(0.975, difference.df) * difference.se
    assert (difference.low, difference.high) == pytest.approx((difference.estimate - half, difference.estimate + half))
    assert difference.p == pytest.approx(2 * stats.t.sf(abs(difference.estimate) / difference.se, difference.df))
    assert {c["method"] for c in fit.coefficients} == {"cr2"} and all(c["df"] < 15 for c in fit.coefficients)
    reading = " ".join(fit.reading)
    assert "clustered by group (mini-society) (16 clusters)" in reading
    assert "CR2" in reading and "Bell–McCaffrey degrees of freedom" in reading and "fewer than 50 clusters" in reading
    assert "mixed-effects logit" in reading
    html = analysis.report_html(scope=scope, title="t")
    assert "SE (CR2)</th><th>df</th>" in html and "<td>cr2</td>" not in html


def test_the_score_bootstrap_on_request_inverts_its_test_and_says_so(planted: Session) -> None:
    Group.objects.filter(session=planted, number__gt=16).delete()
    scope = Scope.session(planted.pk)
    fit = analysis.fit_regression(frame=analysis.choice_frame(scope=scope), inference="bootstrap", draws=999)
    assert not fit.error and (fit.n_clusters, fit.method) == (16, "score-bootstrap")
    (difference,) = fit.differences
    assert difference.low < difference.estimate < difference.high
    # Inverting the test: at the bounds the p-value is alpha (within the bisection's step).
    assert fit.bootstrap.test(fit.weights({"round:disclosed": 1.0}), difference.high + 0.01).p <= 0.05
    assert fit.bootstrap.test(fit.weights({"round:disclosed": 1.0}), difference.high - 0.01).p > 0.05
    reading = " ".join(fit.reading)
    assert "score bootstrap" in reading and "as asked" in reading and "Webb" in reading


def test_belief_accuracy_table(planted: Session) -> None:
    rows = analysis.belief_rows(scope=Scope.session(planted.pk))
    assert {(r["condition"], r["round"], r["true_kind"]) for r in rows} == {("hidden", ROUNDS, "bot"), ("hidden", ROUNDS, "human")}
    for r in rows:
        # S1 says "human" for all 4 candidates, S2 "bot": for each kind, half of the guesses are right.
        assert r["n"] == 2 * 2 * GROUPS_PER_CONDITION
        assert r["guessed_bot"] == r["guessed_human"] == 2 * GROUPS_PER_CONDITION
        assert r["no_guess"] == 0
        assert r["accuracy"] == pytest.approx(0.5) and r["misattributed"] == pytest.approx(0.5)
        assert r["accuracy_low"] < 0.5 < r["accuracy_high"]
        assert r["mean_confidence"] == pytest.approx(70)


def test_belief_intervals_are_clustered(planted: Session) -> None:
    """Every group is right half the time, so clustering by group costs nothing (design effect 1); each selector
    is always right or always wrong about a kind, so by selector the design effect is about 2 (two guesses per
    selector and kind, perfectly correlated) and the interval wider."""
    by_group = analysis.belief_rows(scope=Scope.session(planted.pk))
    by_selector = analysis.belief_rows(scope=Scope.session(planted.pk), cluster="selector")
    for g, s in zip(by_group, by_selector, strict=True):
        assert (g["cluster"], g["n_clusters"], g["design_effect"]) == ("group", GROUPS_PER_CONDITION, 1.0)
        assert (s["cluster"], s["n_clusters"]) == ("selector", 2 * GROUPS_PER_CONDITION) and s["design_effect"] > 1.9
        assert s["accuracy_low"] < g["accuracy_low"] < 0.5 < g["accuracy_high"] < s["accuracy_high"]
    with pytest.raises(ValueError, match="cluster level"):
        analysis.belief_rows(scope=Scope.session(planted.pk), cluster="table")


def test_summary_csv_plots_and_report(planted: Session, tmp_path: Path) -> None:
    scope = Scope.session(planted.pk)
    rows = analysis.summary_rows(scope=scope)
    parsed = list(csv.DictReader(io.StringIO(analysis.rows_csv(rows, analysis.SUMMARY_COLUMNS))))
    assert len(parsed) == len(rows) and list(parsed[0]) == [name for name, _ in analysis.SUMMARY_COLUMNS]
    assert float(parsed[0]["share_bot"]) == pytest.approx(rows[0]["share_bot"], rel=1e-5)
    png = analysis.plot(rows, fmt="png", chance=0.5)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    svg = analysis.plot(rows, fmt="svg")
    assert b"<svg" in svg and svg == analysis.plot(rows, fmt="svg")  # deterministic
    with pytest.raises(ValueError):
        analysis.plot(rows, fmt="gif")  # type: ignore[arg-type]

    call_command("analyze", session=planted.pk, out=tmp_path / "report")
    out = tmp_path / "report"
    assert {p.name for p in out.iterdir()} == {"report.html", "summary.csv", "beliefs.csv", "share_to_bots.png",
                                               "share_to_bots.svg", "return_ratio.png", "return_ratio.svg",
                                               "regression.csv", "regression.txt"}
    html = (out / "report.html").read_text()
    # Self-contained: plots inline, nothing loaded from elsewhere.
    assert html.count("<svg") >= 2 and "<script" not in html and "<link" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "round:disclosed" in html and "rose across rounds" in html and "clustered by group" in html
    assert "100 clusters" in html and "mixed-effects" in html
    assert (out / "summary.csv").read_text() == analysis.rows_csv(rows, analysis.SUMMARY_COLUMNS)
    coefficients = list(csv.DictReader(io.StringIO((out / "regression.csv").read_text())))
    assert [c["term"] for c in coefficients] == ["const", "round", "disclosed", "round:disclosed"]
    assert {(c["cluster"], c["n_clusters"], c["method"], c["df"]) for c in coefficients} == {("group", "100", "crve", "99")}
    assert "SE (CR1)</th><th>df</th>" in html


def test_analyze_refuses_an_unknown_cluster_or_method(planted: Session, tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="cluster level must be one of group, session, selector, not 'nonsense'"):
        call_command("analyze", session=planted.pk, out=tmp_path / "x", cluster="nonsense")
    with pytest.raises(CommandError, match="inference method must be one of auto, cr2, bootstrap, crve"):
        call_command("analyze", session=planted.pk, out=tmp_path / "x", inference="magic")
    assert not (tmp_path / "x").exists()
    call_command("analyze", session=planted.pk, out=tmp_path / "s", cluster="selector", inference="crve")
    assert "clustered by selector (300 clusters)" in (tmp_path / "s" / "regression.txt").read_text()


def test_analyze_refuses_bad_scope(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="No experiment"):
        call_command("analyze", experiment="nope", out=tmp_path / "x")
    with pytest.raises(CommandError, match="No session"):
        call_command("analyze", session=999999, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_regression_explains_when_it_cannot_fit() -> None:
    experiment = factories.experiment_create(n_rounds=3)
    session = factories.session_create(experiment)
    fit = analysis.regression(scope=Scope.session(session.pk))
    assert fit.error == "No choices to model yet."
    assert analysis.summary_rows(scope=Scope.session(session.pk)) == []
    assert analysis.plot([], fmt="png").startswith(b"\x89PNG")


def test_importing_the_web_modules_does_not_import_heavy_libraries() -> None:
    """pandas, statsmodels and matplotlib load only when an analysis runs, never for participant pages."""
    code = ("import django, os, sys; os.environ['DJANGO_SETTINGS_MODULE']='config.settings.test'; django.setup();"
            "import config.urls, experiment.views, experiment.consumers, experiment.staff_views, experiment.api, "
            "experiment.export, experiment.analysis;"
            "heavy=[m for m in ('pandas','statsmodels','matplotlib','numpy') if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2], check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_regression_refuses_a_condition_seen_in_one_round_only(planted: Session) -> None:
    """As in a running session whose second arm has only played round 1: no slope can be estimated for it."""
    Choice.objects.filter(group__session=planted, group__condition__name="hidden", round_number__gt=1).delete()
    fit = analysis.regression(scope=Scope.session(planted.pk))
    assert fit.error == ("Condition hidden has choices from a single round so far: its change across rounds cannot be "
                         "estimated yet.")
    assert not fit.coefficients and not fit.reading


def test_wilson_bounds_are_exact_at_the_extremes() -> None:
    from experiment.analysis import wilson

    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    low, high = wilson(5, 10)
    assert 0.23 < low < 0.24 and 0.76 < high < 0.77
    assert wilson(0, 0) == (None, None)
