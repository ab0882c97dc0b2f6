"""The small-cluster inference: CR2 with Bell–McCaffrey degrees of freedom, the score bootstrap, its test-inverted
intervals, clustered shares.

Pure numpy: no database. Data are planted with a group-level random intercept and a group-level random
slope, so that choices within a group are correlated across rounds and clustering by group matters.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from experiment import analysis
from experiment.inference import CR2, WEBB, ScoreBootstrap, cluster_share_interval, crve_test, webb_weights

INTERACTION = np.array([0.0, 0.0, 0.0, 1.0])


def planted(*, groups: int, rng: np.random.Generator, slope: float = 0.0, group_slope_sd: float = 0.15,
            rounds: int = 10, selectors: int = 3) -> pd.DataFrame:
    """Choices shaped like analysis.choice_frame: arms alternate over groups; ``slope`` per round in disclosed."""
    rows = []
    for g in range(groups):
        disclosed = g % 2 == 1
        u, w = rng.normal(0, 0.5), rng.normal(0, group_slope_sd)
        for s in range(selectors):
            v = rng.normal(0, 0.5)
            for r in range(1, rounds + 1):
                eta = -0.5 + u + v + (w + (slope if disclosed else 0.0)) * (r - 1)
                rows.append({"bot": int(rng.random() < 1 / (1 + math.exp(-eta))), "round": r,
                             "condition": "disclosed" if disclosed else "hidden", "selector_id": f"{g}/{s}",
                             "group_id": g, "session_id": 1})
    return pd.DataFrame(rows)


def arrays(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = (frame["condition"] == "disclosed").to_numpy(float)
    r = frame["round"].to_numpy(float) - 1
    return np.column_stack([np.ones(len(frame)), r, d, r * d]), frame["bot"].to_numpy(float), \
        pd.factorize(frame["group_id"])[0]


def test_webb_weights_have_six_points_mean_zero_variance_one() -> None:
    w = webb_weights(n_clusters=7, draws=60000, rng=np.random.default_rng(1))
    assert w.shape == (60000, 7)
    assert set(np.round(np.unique(w), 6)) == set(np.round(WEBB, 6))
    assert abs(w.mean()) < 0.01 and abs((w ** 2).mean() - 1) < 0.01


def test_restricted_fit_satisfies_the_restriction_and_is_the_ml_fit_at_the_estimate() -> None:
    import statsmodels.api as sm

    x, y, c = arrays(planted(groups=12, rng=np.random.default_rng(2), slope=0.3))
    full = sm.GLM(y, x, family=sm.families.Binomial()).fit()
    boot = ScoreBootstrap(design=x, y=y, clusters=c, draws=199, seed=1)
    at_estimate = boot.restricted(INTERACTION, float(full.params[3]))
    assert at_estimate == pytest.approx(np.asarray(full.params), abs=1e-6)
    at_zero = boot.restricted(INTERACTION, 0.0)
    assert at_zero[3] == pytest.approx(0.0, abs=1e-12)
    reduced = sm.GLM(y, x[:, :3], family=sm.families.Binomial()).fit()
    assert at_zero[:3] == pytest.approx(np.asarray(reduced.params), abs=1e-6)
    # A linear combination: the disclosed slope round + round:disclosed = 0.2.
    combo = np.array([0.0, 1.0, 0.0, 1.0])
    assert float(combo @ boot.restricted(combo, 0.2)) == pytest.approx(0.2, abs=1e-10)
    # At the restricted estimate the scores of the free directions sum to zero.
    scores, _ = boot.cluster_scores(at_zero)
    assert scores.sum(axis=0)[:3] == pytest.approx(np.zeros(3), abs=1e-6)


def test_score_bootstrap_p_values_are_uniform_under_a_planted_null() -> None:
    """300 studies of 12 groups with no difference in slopes: p-values spread evenly over (0, 1).

    Measured over a few thousand studies at 10–12 groups the rejection rate is about 6–7 % (slightly liberal with
    6 groups per arm; docs/analysis.md has the rates at 10–80 groups). With 300 studies, 34 or more rejections
    (11 %) would be more than 2.5 standard errors above even that; clustering by selector instead rejects far
    more often.
    """
    rng = np.random.default_rng(3)
    ps = []
    for rep in range(300):
        x, y, c = arrays(planted(groups=12, rng=rng))
        ps.append(ScoreBootstrap(design=x, y=y, clusters=c, draws=199, seed=rep).test(INTERACTION, 0.0).p)
    ps = np.array(ps)
    assert (ps < 0.05).sum() <= 33
    assert 0.4 <= (ps < 0.5).mean() <= 0.6
    # Each fifth of (0, 1) holds about 60 p-values.
    assert np.histogram(ps, bins=5, range=(0, 1))[0].min() >= 40


def test_score_bootstrap_detects_a_planted_slope() -> None:
    x, y, c = arrays(planted(groups=20, rng=np.random.default_rng(4), slope=0.4))
    boot = ScoreBootstrap(design=x, y=y, clusters=c, draws=999, seed=1)
    assert boot.test(INTERACTION, 0.0).p < 0.01
    assert boot.test(INTERACTION, 0.4).p > 0.05


def test_interval_by_test_inversion_brackets_the_estimate_and_matches_crve_with_many_groups() -> None:
    frame = planted(groups=120, rng=np.random.default_rng(5), slope=0.3, group_slope_sd=0.05)
    fit = analysis.fit_regression(frame=frame, inference="bootstrap", draws=999, describe=False)
    crve = analysis.fit_regression(frame=frame, inference="crve", describe=False)
    (boot,), (wald,) = fit.differences, crve.differences
    assert boot.low < boot.estimate < boot.high
    assert boot.estimate == pytest.approx(wald.estimate)
    # With 120 groups the small-cluster method and the sandwich agree (within a tenth of the width).
    width = wald.high - wald.low
    assert abs(boot.low - wald.low) < 0.1 * width and abs(boot.high - wald.high) < 0.1 * width


def test_group_clustered_se_is_larger_than_selector_clustered_with_a_group_effect() -> None:
    """A random slope per group makes a group's selectors move together across rounds: clustering by selector
    misses it and understates the uncertainty of the slopes."""
    frame = planted(groups=40, rng=np.random.default_rng(6), slope=0.2, group_slope_sd=0.3)
    by_group = analysis.fit_regression(frame=frame, cluster="group", inference="crve", describe=False)
    by_selector = analysis.fit_regression(frame=frame, cluster="selector", inference="crve", describe=False)
    assert by_group.n_clusters == 40 and by_selector.n_clusters == 120
    se_group = by_group.estimate({"round:disclosed": 1.0})[1]
    se_selector = by_selector.estimate({"round:disclosed": 1.0})[1]
    assert se_group > 1.3 * se_selector


def test_crve_test_uses_t_on_g_minus_one_degrees_of_freedom() -> None:
    from scipy import stats

    p, low, high = crve_test(estimate=0.5, se=0.2, n_clusters=10)
    assert p == pytest.approx(2 * stats.t.sf(2.5, 9))
    assert high - 0.5 == pytest.approx(0.2 * stats.t.ppf(0.975, 9)) and 0.5 - low == pytest.approx(high - 0.5)


def test_cluster_share_interval_widens_with_the_design_effect() -> None:
    from experiment.analysis import wilson

    # 20 clusters of 10 choices, each cluster all-bot or all-human: every cluster is one observation.
    clumped = cluster_share_interval([(10, 10 if g % 2 else 0) for g in range(20)])
    spread = cluster_share_interval([(10, 5) for _ in range(20)])
    assert clumped["share"] == spread["share"] == 0.5
    assert clumped["deff"] == pytest.approx(10 * 20 / 19)
    assert spread["deff"] == 1.0  # identical clusters: the floor
    iid_low, iid_high = wilson(100, 200)
    assert spread["low"] < iid_low and spread["high"] > iid_high  # t(19) is wider than the normal
    assert clumped["high"] - clumped["low"] > 2.5 * (iid_high - iid_low)
    # Near a Wilson interval of 20 observations (the clusters), with t(19).
    assert clumped["low"] == pytest.approx(0.5 - 0.22, abs=0.03)
    assert cluster_share_interval([]) == {"share": None, "low": None, "high": None, "deff": None, "n_clusters": 0}
    none = cluster_share_interval([(10, 0), (5, 0)])
    assert none["low"] == 0.0 and none["deff"] == 1.0 and none["high"] < 1


# ---- CR2 ----------------------------------------------------------------------------------------------

def test_cr2_with_one_observation_per_cluster_is_hc2_and_welch_for_two_samples() -> None:
    """For a linear model with singleton clusters CR2 is HC2; for a difference of two means HC2 is Welch's variance
    and the Bell–McCaffrey degrees of freedom have a closed form (the Welch–Satterthwaite one with equal
    working variances)."""
    import statsmodels.api as sm

    rng = np.random.default_rng(3)
    n1, n2 = 7, 12
    d = np.r_[np.zeros(n1), np.ones(n2)]
    x = np.column_stack([np.ones(n1 + n2), d])
    y = rng.normal(size=n1 + n2) * np.where(d == 1, 3.0, 1.0)
    ols = sm.OLS(y, x).fit(cov_type="HC2")
    cr2 = CR2(weighted_design=x, working_residuals=y - x @ ols.params, clusters=np.arange(n1 + n2))
    se, df = cr2.contrast([0.0, 1.0])
    assert se == pytest.approx(ols.bse[1], rel=1e-10)
    assert se == pytest.approx(math.sqrt(y[:n1].var(ddof=1) / n1 + y[n1:].var(ddof=1) / n2), rel=1e-10)
    assert df == pytest.approx((1 / n1 + 1 / n2) ** 2 / (1 / (n1 ** 2 * (n1 - 1)) + 1 / (n2 ** 2 * (n2 - 1))))
    mean = CR2(weighted_design=np.ones((9, 1)), working_residuals=y[:9] - y[:9].mean(), clusters=np.arange(9))
    se, df = mean.contrast([1.0])
    assert (se, df) == pytest.approx((y[:9].std(ddof=1) / 3, 8.0))


def test_cr2_degrees_of_freedom_fall_when_a_few_clusters_carry_the_contrast() -> None:
    """20 clusters: a regressor balanced over them leaves about G − 2 degrees of freedom; one carried by 2 clusters
    leaves close to 1, so the t quantile widens the interval (the reason CR2 keeps its size with few treated
    clusters)."""
    rng = np.random.default_rng(5)
    clusters = np.repeat(np.arange(20), 15)
    for treated, low, high in ((10, 15, 18.01), (2, 0.9, 2.5)):
        d = (clusters < treated).astype(float)
        x = np.column_stack([np.ones(len(d)), d])
        y = rng.normal(size=len(d))
        beta = np.linalg.lstsq(x, y, rcond=None)[0]
        _, df = CR2(weighted_design=x, working_residuals=y - x @ beta, clusters=clusters).contrast([0.0, 1.0])
        assert low < df < high, (treated, df)


def test_cr2_for_a_logit_is_larger_than_the_uncorrected_sandwich_and_refuses_one_cluster() -> None:
    import statsmodels.api as sm

    frame = planted(groups=10, rng=np.random.default_rng(8))
    x, y, codes = arrays(frame)
    fit = sm.GLM(y, x, family=sm.families.Binomial()).fit(cov_type="cluster", cov_kwds={"groups": codes,
                                                                                         "use_correction": False})
    cr2 = CR2.logit(design=x, y=y, beta=fit.params, clusters=codes)
    for j in range(4):
        se, df = cr2.contrast(np.eye(4)[j])
        assert se > fit.bse[j] and 1 < df <= 9
    p, low, high = cr2.test(INTERACTION, estimate=float(fit.params[3]))
    assert low < fit.params[3] < high and 0 < p <= 1
    with pytest.raises(ValueError, match="at least two clusters"):
        CR2.logit(design=x, y=y, beta=fit.params, clusters=np.zeros(len(y), dtype=int))
