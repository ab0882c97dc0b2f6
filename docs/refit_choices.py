"""Refit the preference-shift logit from an exported choices.csv alone (no PartnerLab needed).

    python refit_choices.py choices.csv [--draws 9999] [--seed 20250718]

Needs only numpy, pandas, scipy and statsmodels. It fits the model ``manage.py analyze`` fits,

    logit P(bot) = const + round0 + disclosed + round0:disclosed      (round0 = round − 1)

on the rows with ``counted = True``, prints the estimates with standard errors clustered by group: CR1 (with
Student's t on G − 1 degrees of freedom, what ``analyze`` uses from 50 groups on) and CR2 (with Student's t on
the Bell–McCaffrey degrees of freedom, what ``analyze`` uses below 50 groups), and a wild cluster score
bootstrap p-value for the round0:disclosed term (Webb weights, null imposed; ``analyze --inference
bootstrap``). With the same draws and seed the bootstrap p-value is the one ``analyze`` reports, because the
clusters are numbered in the same order (the file's row order). See docs/analysis.md for what each step means.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import pandas as pd
import statsmodels.api as sm
from scipy import stats

WEBB = np.array([-math.sqrt(1.5), -1.0, -math.sqrt(0.5), math.sqrt(0.5), 1.0, math.sqrt(1.5)])


def load(path: str, reference: str = "hidden") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The counted choices and the design matrix (columns const, round, <arm>, round:<arm>)."""
    raw = pd.read_csv(path)
    counted = raw[raw["counted"].astype(str) == "True"].reset_index(drop=True)
    r0 = (counted["round"] - counted["round"].min()).astype(float)
    design = pd.DataFrame({"const": 1.0, "round": r0})
    for arm in [c for c in pd.unique(counted["condition"]) if c != reference]:
        is_arm = (counted["condition"] == arm).astype(float)
        design[arm] = is_arm
        design[f"round:{arm}"] = r0 * is_arm
    return counted, design


def score_bootstrap_p(y: np.ndarray, x: np.ndarray, clusters: np.ndarray, column: int, *, draws: int,
                      seed: int) -> float:
    """Two-sided p-value of coefficient ``column`` = 0 by the wild cluster score bootstrap (docs/analysis.md)."""
    free = np.delete(np.arange(x.shape[1]), column)
    restricted = np.zeros(x.shape[1])
    restricted[free] = sm.GLM(y, x[:, free], family=sm.families.Binomial()).fit().params
    mu = 1 / (1 + np.exp(-(x @ restricted)))
    n_clusters = clusters.max() + 1

    def by_cluster(per_obs: np.ndarray) -> np.ndarray:
        return np.stack([np.bincount(clusters, weights=per_obs[:, j], minlength=n_clusters)
                         for j in range(per_obs.shape[1])], axis=1)

    scores = by_cluster(x * (y - mu)[:, None])
    information = (x * (mu * (1 - mu))[:, None]).T @ x
    direction = np.linalg.solve(information, np.eye(x.shape[1])[column])
    a = scores @ direction
    t = a.sum() / math.sqrt(a @ a)
    w = np.random.default_rng(seed).choice(WEBB, size=(draws, n_clusters))
    # Each draw: perturb the cluster scores, re-estimate the free coefficients by one Newton step.
    basis = np.eye(x.shape[1])[:, free]
    moves = by_cluster(x * (mu * (1 - mu) * (x @ direction))[:, None]) @ basis
    steps = np.linalg.solve(basis.T @ information @ basis, basis.T @ (w @ scores).T).T
    a_boot = w * a[None, :] - steps @ moves.T
    t_boot = a_boot.sum(axis=1) / np.sqrt((a_boot ** 2).sum(axis=1))
    return float(np.mean(np.abs(t_boot) >= abs(t) - 1e-12))


def cr2(y: np.ndarray, x: np.ndarray, beta: np.ndarray, clusters: np.ndarray, column: int) -> tuple[float, float]:
    """CR2 standard error and Bell–McCaffrey degrees of freedom of coefficient ``column`` (docs/analysis.md)."""
    mu = 1 / (1 + np.exp(-(x @ beta)))
    w = mu * (1 - mu)
    xt, et = x * np.sqrt(w)[:, None], (y - mu) / np.sqrt(w)  # the last IRLS step's weighted design and residuals
    information = xt.T @ xt
    bread = np.linalg.inv(information)
    bc = bread[:, column]
    n_clusters = clusters.max() + 1
    terms, uu, q = np.empty(n_clusters), np.empty(n_clusters), np.empty((n_clusters, x.shape[1]))
    for g in range(n_clusters):
        rows = np.flatnonzero(clusters == g)
        values, vectors = np.linalg.eigh(np.eye(len(rows)) - xt[rows] @ bread @ xt[rows].T)
        keep = values > 1e-10
        a = (vectors[:, keep] / np.sqrt(values[keep])) @ vectors[:, keep].T  # (I − H_gg)^(−1/2)
        u = a @ (xt[rows] @ bc)
        terms[g], uu[g], q[g] = u @ et[rows], u @ u, bread @ (xt[rows].T @ u)
    m = np.diag(uu) - q @ information @ q.T
    return math.sqrt(terms @ terms), float(np.trace(m) ** 2 / np.sum(m * m))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("choices", help="choices.csv from a PartnerLab export")
    parser.add_argument("--draws", type=int, default=9999)
    parser.add_argument("--seed", type=int, default=20250718)
    args = parser.parse_args(argv)
    counted, design = load(args.choices)
    clusters = pd.factorize(counted["group_id"])[0]
    n_clusters = int(clusters.max()) + 1
    fit = sm.GLM(counted["candidate_is_bot"].astype(str).eq("True").astype(float), design,
                 family=sm.families.Binomial()).fit(cov_type="cluster", cov_kwds={"groups": clusters})
    print(f"{len(counted)} counted choices, {counted['selector_id'].nunique()} selectors, {n_clusters} groups")
    print(f"{'term':<18} {'estimate':>9} {'SE (CR1)':>9} {'p t(G-1)':>9} {'SE (CR2)':>9} {'BM df':>6} {'p CR2':>9} "
          f"{'95 % low':>9} {'95 % high':>9}  (interval: CR2, t on BM df)")
    out: dict[str, float] = {}
    for i, term in enumerate(design.columns):
        b, se = fit.params[term], fit.bse[term]
        p = 2 * stats.t.sf(abs(b / se), n_clusters - 1)
        se2, df = cr2(fit.model.endog, design.to_numpy(), np.asarray(fit.params), clusters, i)
        p2, half = 2 * stats.t.sf(abs(b / se2), df), stats.t.ppf(0.975, df) * se2
        print(f"{term:<18} {b:>9.4f} {se:>9.4f} {p:>9.4f} {se2:>9.4f} {df:>6.2f} {p2:>9.4f} {b - half:>9.4f} "
              f"{b + half:>9.4f}")
        out |= {f"estimate:{term}": float(b), f"se:{term}": float(se), f"p:{term}": float(p),
                f"se_cr2:{term}": se2, f"df_cr2:{term}": df, f"p_cr2:{term}": float(p2)}
    interaction = [t for t in design.columns if t.startswith("round:")]
    for term in interaction:
        p = score_bootstrap_p(fit.model.endog, design.to_numpy(), clusters, list(design.columns).index(term),
                              draws=args.draws, seed=args.seed)
        print(f"score bootstrap p for {term} = 0: {p:.4f} ({args.draws} Webb draws, seed {args.seed})")
        out[f"p_boot:{term}"] = p
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
