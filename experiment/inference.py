"""Inference for the preference-shift logit when the independent units are few: groups, not choices.

The selectors of one group see the same candidates and the same bots' behaviour, so their choices are
correlated; the unit of independent replication is the group (or the session). Studies run 10–80 groups,
and with so few clusters the usual cluster-robust (sandwich) standard errors are too small and Wald tests
reject too often. Three tools, all pure functions of arrays (no ORM):

- :class:`CR2`: the bias-reduced cluster-robust variance with Bell–McCaffrey degrees of freedom, the default
  below 50 clusters (``analyze --inference auto``). In simulated studies it holds the nominal size best of
  the methods tried (docs/analysis.md, "What was measured").
- :class:`ScoreBootstrap`: the wild cluster *score* bootstrap of Kline & Santos (2012) for a maximum-
  likelihood model, with Webb's six-point weights and the null imposed. For H0: Rβ = r it fits the logit
  under the restriction, takes each cluster's score at the restricted estimate, projects it on the tested
  direction (a_g = R H⁻¹ s_g, H the information matrix at the restricted estimate) and compares the robust
  score statistic t = Σ a_g / √Σ a_g² with its bootstrap distribution t* = Σ a*_g / √Σ a*_g², where a*_g
  is w_g a_g after one Newton step of the free parameters on the perturbed scores (see :meth:`ScoreBootstrap.test`)
  and w_g is drawn from Webb's weights (±√½, ±1, ±√1.5, each with probability 1/6). Neither the model nor the
  Hessian is re-estimated per draw, which is what makes the bootstrap cheap and stable for a logit,
  where re-fitting a wild-bootstrapped binary outcome is not possible. Two-sided p-value: the share of
  |t*| ≥ |t|. Confidence interval: the set of r whose test is not rejected (test inversion), found by
  bisection with the same draws for every r.
- :func:`cluster_share_interval`: a share with a design-effect-adjusted Wilson interval, the variance of
  the share estimated from cluster totals (a ratio estimator) and the normal quantile replaced by
  Student's t with G − 1 degrees of freedom.

Why hand-written: the maintained wild-bootstrap libraries (``wildboottest``, pyfixest's wild bootstrap,
R's ``fwildclusterboot``) support linear models only. The code here is small, and the tests check it
against statsmodels (unrestricted fit, sandwich) and by simulation (p-values uniform under a planted null).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

WEBB = np.array([-math.sqrt(1.5), -1.0, -math.sqrt(0.5), math.sqrt(0.5), 1.0, math.sqrt(1.5)])


def webb_weights(*, n_clusters: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """A draws × n_clusters matrix of Webb's six-point weights (mean 0, variance 1)."""
    return rng.choice(WEBB, size=(draws, n_clusters))


def _expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logit_fit(y: np.ndarray, design: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Maximum-likelihood logit with an offset (statsmodels GLM); raises when it does not converge."""
    import warnings

    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", category=ConvergenceWarning)
        warnings.simplefilter("error", category=PerfectSeparationWarning)
        warnings.simplefilter("error", category=RuntimeWarning)
        fit = sm.GLM(y, design, family=sm.families.Binomial(), offset=offset).fit()
    return np.asarray(fit.params, dtype=float)


@dataclass
class Test:
    """One bootstrap test of Rβ = r: the robust score statistic, its p-value and the draws used."""

    value: float
    statistic: float
    p: float


class ScoreBootstrap:
    """Score bootstrap tests of linear restrictions on a logit's coefficients, clustered by ``clusters``.

    ``design``: n × k, ``y``: n zeros and ones, ``clusters``: n integer codes 0..G−1. One matrix of
    Webb weights is drawn at construction (``draws`` × G) and reused by every test, so a p-value is a
    deterministic function of r and confidence bounds found by bisection are consistent.
    """

    def __init__(self, *, design: np.ndarray, y: np.ndarray, clusters: np.ndarray, draws: int, seed: int) -> None:
        self.x = np.asarray(design, dtype=float)
        self.y = np.asarray(y, dtype=float)
        self.clusters = np.asarray(clusters, dtype=int)
        self.n_clusters = int(self.clusters.max()) + 1 if len(self.clusters) else 0
        if self.n_clusters < 2:
            raise ValueError("The score bootstrap needs at least two clusters.")
        if draws < 99:
            raise ValueError(f"Use at least 99 bootstrap draws, not {draws}.")
        self.draws = draws
        self.seed = seed
        self.weights = webb_weights(n_clusters=self.n_clusters, draws=draws, rng=np.random.default_rng(seed))

    @staticmethod
    def free_basis(restriction: np.ndarray) -> np.ndarray:
        """An orthonormal basis (k × (k − 1)) of the directions a restriction leaves free."""
        _, _, vt = np.linalg.svd(np.asarray(restriction, dtype=float)[None, :])
        return vt[1:].T

    def restricted(self, restriction: np.ndarray, value: float) -> np.ndarray:
        """β maximising the likelihood subject to restriction · β = value."""
        a = np.asarray(restriction, dtype=float)
        base = a * value / float(a @ a)
        free = self.free_basis(a)  # β = base + free @ γ
        gamma = _logit_fit(self.y, self.x @ free, self.x @ base)
        return base + free @ gamma

    def _by_cluster(self, per_obs: np.ndarray) -> np.ndarray:
        return np.stack([np.bincount(self.clusters, weights=per_obs[:, j], minlength=self.n_clusters)
                         for j in range(per_obs.shape[1])], axis=1)

    def cluster_scores(self, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-cluster scores (G × k) and the information matrix (k × k) at ``beta``."""
        mu = _expit(self.x @ beta)
        scores = self._by_cluster(self.x * (self.y - mu)[:, None])
        information = (self.x * (mu * (1 - mu))[:, None]).T @ self.x
        return scores, information

    def test(self, restriction: Sequence[float], value: float) -> Test:
        """Two-sided score bootstrap test of restriction · β = value.

        Each draw's statistic is computed the way the original one is: the original scores come from a fit that
        estimated the free parameters (so their free components sum to zero), and so, in each draw, the
        perturbed scores w_g s_g are moved by one Newton step of the free parameters, s*_g = w_g s_g − H_g N Δγ*,
        Δγ* = (N'HN)⁻¹ N' Σ w_h s_h (N the free directions, H_g cluster g's information). The numerator is
        unchanged by that step (the tested direction is orthogonal to N); the denominator Σ a*_g² is what it
        corrects. Without it the draws' denominators are too large, their statistics too concentrated around 0,
        and the test rejects a little too often with few clusters.
        """
        a = np.asarray(restriction, dtype=float)
        beta = self.restricted(a, value)
        scores, information = self.cluster_scores(beta)
        direction = np.linalg.solve(information, a)
        projected = scores @ direction
        spread = math.sqrt(float(projected @ projected))
        if spread == 0.0:
            return Test(value=value, statistic=0.0, p=1.0)
        statistic = float(projected.sum()) / spread
        free = self.free_basis(a)
        weight = _expit(self.x @ beta) * (1 - _expit(self.x @ beta))
        # c_g = N' H_g H⁻¹ a, one row per cluster: how a free-parameter step moves cluster g's projected score.
        moves = self._by_cluster(self.x * (weight * (self.x @ direction))[:, None]) @ free
        steps = np.linalg.solve(free.T @ information @ free, free.T @ (self.weights @ scores).T).T
        boot_scores = self.weights * projected[None, :] - steps @ moves.T
        boot = boot_scores.sum(axis=1) / np.sqrt((boot_scores ** 2).sum(axis=1))
        return Test(value=value, statistic=statistic, p=float(np.mean(np.abs(boot) >= abs(statistic) - 1e-12)))

    def interval(self, restriction: Sequence[float], *, estimate: float, scale: float, alpha: float = 0.05,
                 tolerance: float = 1e-3) -> tuple[float, float]:
        """The 1 − alpha confidence interval by test inversion: the values r not rejected at level alpha.

        ``estimate``: the unrestricted estimate (inside the interval); ``scale``: a rough standard error that
        sets the first step outwards. Each end is bracketed by doubling steps, then bisected to within
        ``tolerance`` × scale. Returns ±inf for an end that stays unrejected up to 64 × scale away.
        """
        step0 = scale if scale > 0 and math.isfinite(scale) else 1.0

        def accepted(r: float) -> bool:
            return self.test(restriction, r).p > alpha

        ends = []
        for direction in (-1.0, 1.0):
            inside, step = estimate, step0
            outside = None
            while step <= 64 * step0:
                candidate = estimate + direction * step
                if accepted(candidate):
                    inside = candidate
                    step *= 2
                else:
                    outside = candidate
                    break
            if outside is None:
                ends.append(direction * math.inf)
                continue
            while abs(outside - inside) > tolerance * step0:
                middle = (inside + outside) / 2
                if accepted(middle):
                    inside = middle
                else:
                    outside = middle
            ends.append((inside + outside) / 2)
        return ends[0], ends[1]


class CR2:
    """Bias-reduced cluster-robust variance (CR2, Bell & McCaffrey 2002) with the Satterthwaite-type degrees of
    freedom of Bell & McCaffrey as Imbens & Kolesár (2016) compute them, for a model fitted by weighted least
    squares or, at its estimate, by iteratively reweighted least squares (a GLM).

    ``weighted_design`` X̃ (n × k) and ``working_residuals`` ẽ (n) are the design and residuals of that last
    weighted step: for a logit, X̃ = √w X and ẽ = (y − μ)/√w with w = μ(1 − μ), so that X̃'ẽ is the score and
    X̃'X̃ the information. Each cluster's residuals are inflated by A_g = (I − H_gg)^(−1/2), H_gg the
    cluster's block of the hat matrix X̃(X̃'X̃)⁻¹X̃', which undoes the downward bias of the sandwich with few
    clusters (exactly, for a linear model with independent homoskedastic errors). For a contrast c the
    variance is Σ_g (c'B X̃_g' A_g ẽ_g)², B = (X̃'X̃)⁻¹, and the degrees of freedom are (Σλ)² / Σλ², λ the
    eigenvalues of the G × G matrix M = diag(u_g'u_g) − Q B⁻¹ Q' with u_g = A_g X̃_g B c and row g of Q equal
    to B X̃_g' u_g (that is G'G for Imbens & Kolesár's G = (I − H)[:, g] u_g, reduced so that no n × n
    matrix is formed). The degrees of freedom follow the design, not the outcomes: with few clusters, or
    with a contrast driven by a few of them, they fall well below G − 1, which is what keeps the test's size.

    Why hand-written: statsmodels, pyfixest and linearmodels offer CR1 and the jackknife (CR3) but not CR2
    with these degrees of freedom for a GLM (R's clubSandwich does). The tests check it against exact results:
    HC2 and Welch–Satterthwaite for a linear model with one observation per cluster, n − 1 for a mean.
    """

    def __init__(self, *, weighted_design: np.ndarray, working_residuals: np.ndarray, clusters: np.ndarray) -> None:
        self.x = np.asarray(weighted_design, dtype=float)
        residuals = np.asarray(working_residuals, dtype=float)
        codes = np.asarray(clusters, dtype=int)
        self.n_clusters = int(codes.max()) + 1 if len(codes) else 0
        if self.n_clusters < 2:
            raise ValueError("CR2 needs at least two clusters.")
        self.information = self.x.T @ self.x
        self.bread = np.linalg.inv(self.information)
        # Per cluster: its rows of X̃, A_g X̃_g and A_g ẽ_g (A_g symmetric), computed once for every contrast.
        self.blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for g in range(self.n_clusters):
            rows = np.flatnonzero(codes == g)
            xg = self.x[rows]
            values, vectors = np.linalg.eigh(np.eye(len(rows)) - xg @ self.bread @ xg.T)
            # A cluster that alone determines a coefficient has I − H_gg singular; its inverse square root is
            # taken on the non-null part (a generalised inverse), as clubSandwich does.
            keep = values > 1e-10
            inverse_root = (vectors[:, keep] / np.sqrt(values[keep])) @ vectors[:, keep].T
            self.blocks.append((xg, inverse_root @ xg, inverse_root @ residuals[rows]))

    @classmethod
    def logit(cls, *, design: np.ndarray, y: np.ndarray, beta: np.ndarray, clusters: np.ndarray) -> CR2:
        """CR2 for a logit at its maximum-likelihood estimate ``beta``."""
        x = np.asarray(design, dtype=float)
        mu = _expit(x @ np.asarray(beta, dtype=float))
        w = np.clip(mu * (1 - mu), 1e-12, None)
        return cls(weighted_design=x * np.sqrt(w)[:, None], working_residuals=(np.asarray(y, dtype=float) - mu) / np.sqrt(w),
                   clusters=clusters)

    def contrast(self, c: Sequence[float]) -> tuple[float, float]:
        """(standard error, degrees of freedom) of c'β̂."""
        bc = self.bread @ np.asarray(c, dtype=float)
        terms = np.empty(self.n_clusters)
        uu = np.empty(self.n_clusters)
        q = np.empty((self.n_clusters, len(bc)))
        for g, (xg, axg, aeg) in enumerate(self.blocks):
            terms[g] = bc @ (xg.T @ aeg)  # c'B X̃_g' A_g ẽ_g
            u = axg @ bc  # A_g X̃_g B c
            uu[g] = u @ u
            q[g] = self.bread @ (xg.T @ u)
        m = np.diag(uu) - q @ self.information @ q.T
        trace, trace_sq = float(np.trace(m)), float(np.sum(m * m))  # M symmetric: tr(M²) = Σ m_ij²
        df = trace * trace / trace_sq if trace_sq > 0 else float(self.n_clusters - 1)
        return math.sqrt(float(terms @ terms)), df

    def test(self, c: Sequence[float], *, estimate: float, value: float = 0.0,
             alpha: float = 0.05) -> tuple[float, float, float]:
        """Wald test of c'β = value with the CR2 error and Student's t on the Bell–McCaffrey degrees of freedom:
        (p, low, high) of the 1 − alpha interval."""
        from scipy import stats

        se, df = self.contrast(c)
        quantile = float(stats.t.ppf(1 - alpha / 2, df))
        if se > 0:
            p = float(2 * stats.t.sf(abs(estimate - value) / se, df))
        else:
            p = 1.0 if estimate == value else 0.0
        return p, estimate - quantile * se, estimate + quantile * se


def crve_test(*, estimate: float, se: float, n_clusters: int, value: float = 0.0,
              alpha: float = 0.05) -> tuple[float, float, float]:
    """Wald test and interval from a cluster-robust SE with Student's t on G − 1 degrees of freedom:
    (p, low, high)."""
    from scipy import stats

    df = max(n_clusters - 1, 1)
    quantile = float(stats.t.ppf(1 - alpha / 2, df))
    t = (estimate - value) / se
    return float(2 * stats.t.sf(abs(t), df)), estimate - quantile * se, estimate + quantile * se


# ---- shares -------------------------------------------------------------------------------------------

def cluster_share_interval(totals: Sequence[tuple[int, int]], *, alpha: float = 0.05) -> dict[str, Any]:
    """A share and its interval from per-cluster (choices, bot choices), respecting the clustering.

    The share p = Σ y_g / Σ n_g is a ratio estimator; its variance from the cluster totals is
    G / (G − 1) · Σ (y_g − p n_g)² / (Σ n_g)². The design effect is that variance over the binomial
    p (1 − p) / n, floored at 1 (a design effect below 1 from a handful of clusters is noise, not
    information), and the Wilson interval is computed with the effective sample size n / deff and
    Student's t on G − 1 degrees of freedom instead of the normal quantile. With a single cluster, or
    p at 0 or 1, the design effect cannot be estimated and is taken as 1.
    """
    from scipy import stats

    n = sum(t[0] for t in totals)
    y = sum(t[1] for t in totals)
    g = sum(1 for t in totals if t[0] > 0)
    if n <= 0:
        return {"share": None, "low": None, "high": None, "deff": None, "n_clusters": 0}
    p = y / n
    deff = 1.0
    if g >= 2 and 0 < p < 1:
        variance = g / (g - 1) * sum((yg - p * ng) ** 2 for ng, yg in totals) / n ** 2
        deff = max(1.0, variance / (p * (1 - p) / n))
    quantile = float(stats.t.ppf(1 - alpha / 2, g - 1)) if g >= 2 else float(stats.norm.ppf(1 - alpha / 2))
    n_eff = n / deff
    z2 = quantile * quantile
    denominator = 1 + z2 / n_eff
    centre = (p + z2 / (2 * n_eff)) / denominator
    half = quantile * math.sqrt(p * (1 - p) / n_eff + z2 / (4 * n_eff * n_eff)) / denominator
    low = 0.0 if y <= 0 else max(0.0, centre - half)
    high = 1.0 if y >= n else min(1.0, centre + half)
    return {"share": p, "low": low, "high": high, "deff": deff, "n_clusters": g}
