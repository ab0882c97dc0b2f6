"""Adaptation metrics: do seats respond to how they were treated, and does an influence structure form?

The research question behind them: do LLM agents adapt to the people and agents they interact with, or do
they show "interaction without influence" (they ignore feedback, and no stable structure of who chooses
whom forms)? And do people learn to prefer reliable partners over rounds? docs/analysis.md ("Adaptation")
gives every definition; this module is the one implementation, used by the export (four derived tables,
documented in the codebook) and by the staff report (means by arm and kind).

Two layers:

- pure functions over plain rows (:class:`Seat`, :class:`Decision`, :class:`Pitch` in one
  :class:`History` per group): :func:`words`, :func:`cosine_similarity`, :func:`lexical_turnover`,
  :func:`ols_slope`, :func:`mean_difference`, :func:`concentration`, :func:`rank_persistence`, and the
  per-table row builders :func:`candidate_rows`, :func:`pitch_rows`, :func:`selector_rows`,
  :func:`group_round_rows`. No database, so the tests check each value against a hand computation.
- :func:`histories` reads the groups of an export :class:`~experiment.export.Scope` from the database a batch
  of groups at a time (memory stays bounded by the batch, not the scope), and :data:`TABLES` declares the
  derived export tables.

A measure that cannot be computed (too few rounds, no variation, no pitch) is left empty and a ``*_reason``
column says why: an invented number (0, or a slope through one point) would read as "no adaptation".
"""

from __future__ import annotations

import math
import re
import statistics
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Decisions a machine made in a human seat (after a takeover, or a synthetic filler in a demo) are not the
# person's, as in experiment.analysis.counted_choices.
MACHINE = frozenset({"scripted", "llm", "synthetic"})
# Fewest observations behind a per-seat OLS slope: two points always fit a line exactly.
MIN_SLOPE_OBS = 3
SELECTOR_KINDS = ("human", "bot", "all")
SETTLED_PHASES = frozenset({"feedback", "belief"})
_WORD = re.compile(r"[^\W_]+")


# ---- plain rows -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Seat:
    participant_id: int
    seat: str
    role: str  # "selector" or "candidate"
    kind: str  # "human" or "bot"
    controller: str = ""


@dataclass(frozen=True)
class Decision:
    """One selector's choice in one round, with the chosen candidate's return to them (if decided)."""

    round: int
    selector_id: int
    candidate_id: int | None
    sent: int = 0
    multiplied: int = 0
    timed_out: bool = False
    decided_by: str = ""
    returned: int | None = None
    return_timed_out: bool = False
    return_decided_by: str = ""


@dataclass(frozen=True)
class Pitch:
    round: int
    candidate_id: int
    text: str
    timed_out: bool = False
    decided_by: str = ""


@dataclass
class History:
    """Everything one group stored that the metrics read. ``group`` holds the identifying columns
    (experiment, session_id, group_id, group_number, condition); ``settled_through`` the last settled round."""

    group: dict[str, Any]
    seats: list[Seat]
    decisions: list[Decision] = field(default_factory=list)
    pitches: list[Pitch] = field(default_factory=list)
    settled_through: int = 0


def own_decision(kind: str, decided_by: str, timed_out: bool) -> bool:
    """Whether a decision is the seat's own: not a default applied at a deadline and, in a human seat, made by
    the person (not by a bot or synthetic filler playing the seat). Defaults and takeovers say nothing about
    how the seat's occupant adapts."""
    if timed_out:
        return False
    return kind == "bot" or decided_by not in MACHINE


def settled_through(*, status: str, round_number: int, phase: str, n_rounds: int) -> int:
    """The last round whose return phase has closed (the rule of the export's ``round_complete``)."""
    if status == "finished":
        return max(n_rounds, round_number)
    return round_number if phase in SETTLED_PHASES else round_number - 1


# ---- the measures -------------------------------------------------------------------------------------------

def words(text: str) -> list[str]:
    """The word tokens of a pitch: NFKC-normalised, case-folded, maximal runs of Unicode letters and digits.
    Punctuation, spaces and underscores separate words ("Don't!" → ["don", "t"]); numbers are words."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def cosine_similarity(previous: Sequence[str], current: Sequence[str]) -> float | None:
    """Cosine of the angle between the word-count vectors of two token lists (1: the same words in the same
    proportions, 0: no word in common); None when either has no words."""
    a, b = Counter(previous), Counter(current)
    if not a or not b:
        return None
    dot = sum(n * b[w] for w, n in a.items())
    return dot / (math.sqrt(sum(n * n for n in a.values())) * math.sqrt(sum(n * n for n in b.values())))


def lexical_turnover(previous: Sequence[str], current: Sequence[str]) -> float | None:
    """Share of the word types (distinct words) of the current pitch that the previous pitch did not use
    (0: nothing new, 1: all new); None when either has no words."""
    old, new = set(previous), set(current)
    if not old or not new:
        return None
    return len(new - old) / len(new)


def ols_slope(xs: Sequence[float], ys: Sequence[float], *, min_obs: int = MIN_SLOPE_OBS) -> tuple[float | None, str]:
    """(slope of the least-squares line of y on x with an intercept, ""), or (None, reason) when it is
    undefined or rests on fewer than ``min_obs`` points. The fit is the standard library's
    statistics.linear_regression: a per-seat slope rests on a handful of points, and numpy's per-call cost
    would dominate an export of thousands of groups."""
    if len(xs) < min_obs:
        return None, f"fewer than {min_obs} observations ({len(xs)})"
    if min(xs) == max(xs):
        return None, "the predictor does not vary"
    return statistics.linear_regression([float(x) for x in xs], [float(y) for y in ys]).slope, ""


def mean_difference(ys: Sequence[float], flags: Sequence[bool]) -> tuple[float | None, str]:
    """(mean of y where flag − mean where not flag, ""), the OLS slope on a 0/1 predictor; (None, reason) when
    either side is empty."""
    yes = [y for y, f in zip(ys, flags, strict=True) if f]
    no = [y for y, f in zip(ys, flags, strict=True) if not f]
    if not yes or not no:
        return None, "no observation with the predictor " + ("true" if not yes else "false")
    return sum(yes) / len(yes) - sum(no) / len(no), ""


def concentration(counts: Sequence[int]) -> tuple[float | None, float | None]:
    """(share of the most-chosen candidate, Herfindahl–Hirschman index Σ share²) of choice counts over the
    candidates; (None, None) when nobody chose."""
    total = sum(counts)
    if total <= 0:
        return None, None
    shares = [n / total for n in counts]
    return max(shares), sum(s * s for s in shares)


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, tied values sharing the mean of the ranks they span ([1, 1, 0] → [2.5, 2.5, 1])."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def rank_persistence(previous: Sequence[int], current: Sequence[int]) -> tuple[float | None, str]:
    """(Spearman's rank correlation of the candidates' choice counts in two rounds, ""): the Pearson correlation
    (statistics.correlation) of their average ranks, as scipy.stats.spearmanr computes it (the tests compare the
    two; scipy's per-call cost is 30 times this for the 3–6 candidates of a group, once per group, round and
    selector kind of an export). (None, reason) when either round's counts are all equal (no ranking) or there
    are fewer than two candidates."""
    if len(previous) != len(current):
        raise ValueError("both rounds must count the same candidates")
    if len(current) < 2:
        return None, "fewer than two candidates"
    if len(set(previous)) < 2:
        return None, "every candidate was chosen equally often in the previous round"
    if len(set(current)) < 2:
        return None, "every candidate was chosen equally often in this round"
    return statistics.correlation(average_ranks(previous), average_ranks(current)), ""


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


# ---- per-table rows of one group ---------------------------------------------------------------------------

def _seat_part(seat: Seat) -> dict[str, Any]:
    return {"participant_id": seat.participant_id, "seat": seat.seat, "kind": seat.kind, "controller": seat.controller}


def _return_ratio(d: Decision) -> float | None:
    if d.returned is None or d.multiplied <= 0:
        return None
    return d.returned / d.multiplied


def responsiveness_observations(history: History, candidate: Seat) -> list[tuple[float, bool, float]]:
    """(lagged sent, lagged chosen, return ratio) for each of the candidate's own return decisions from round 2
    on: the selector's transfer in round t−1 to this candidate (0 when they chose someone else, nobody, or
    have no choice stored), whether they chose this candidate in round t−1, and returned / multiplied now."""
    by_selector_round = {(d.selector_id, d.round): d for d in history.decisions}
    out = []
    for d in history.decisions:
        ratio = _return_ratio(d)
        if d.candidate_id != candidate.participant_id or d.round < 2 or ratio is None:
            continue
        if not own_decision(candidate.kind, d.return_decided_by, d.return_timed_out):
            continue
        before = by_selector_round.get((d.selector_id, d.round - 1))
        chosen = before is not None and before.candidate_id == candidate.participant_id
        out.append((float(before.sent) if chosen and before is not None else 0.0, chosen, ratio))
    return out


def pitch_rows(history: History) -> list[dict[str, Any]]:
    """One row per candidate × round with a pitch row stored: its words and how it differs from round t−1's."""
    seats = {s.participant_id: s for s in history.seats if s.role == "candidate"}
    tokens: dict[tuple[int, int], list[str] | None] = {}
    for p in history.pitches:
        seat = seats.get(p.candidate_id)
        if seat is not None:
            tokens[(p.candidate_id, p.round)] = words(p.text) if own_decision(seat.kind, p.decided_by, p.timed_out) else None
    out = []
    for (candidate_id, rnd), current in sorted(tokens.items(), key=lambda kv: (seats[kv[0][0]].seat, kv[0][1])):
        previous = tokens.get((candidate_id, rnd - 1))
        if rnd < 2 or (candidate_id, rnd - 1) not in tokens:
            reason = "first round" if rnd < 2 else "no pitch stored for the previous round"
        elif current is None or previous is None:
            reason = "no pitch of the seat's own in " + ("this round" if current is None else "the previous round")
        elif not current or not previous:
            reason = "no words in " + ("this pitch" if not current else "the previous pitch")
        else:
            reason = ""
        defined = not reason
        out.append({**history.group, "round": rnd, "round_complete": rnd <= history.settled_through,
                    **_seat_part(seats[candidate_id]), "own_pitch": current is not None,
                    "n_words": len(current) if current is not None else None,
                    "n_types": len(set(current)) if current is not None else None,
                    "similarity_to_previous": cosine_similarity(previous, current) if defined else None,  # type: ignore[arg-type]
                    "turnover_from_previous": lexical_turnover(previous, current) if defined else None,  # type: ignore[arg-type]
                    "change_reason": reason})
    return out


def candidate_rows(history: History) -> list[dict[str, Any]]:
    """One row per candidate seat: how its return ratio responds to the treatment it got in the round before,
    and how much its pitch changes from round to round (means of :func:`pitch_rows`)."""
    pitches: dict[int, list[dict[str, Any]]] = {}
    for row in pitch_rows(history):
        pitches.setdefault(row["participant_id"], []).append(row)
    out = []
    for seat in sorted((s for s in history.seats if s.role == "candidate"), key=lambda s: s.seat):
        obs = responsiveness_observations(history, seat)
        sent, chosen, ratio = [o[0] for o in obs], [o[1] for o in obs], [o[2] for o in obs]
        slope, slope_reason = ols_slope(sent, ratio)
        effect, effect_reason = mean_difference(ratio, chosen) if obs else (None, "no return from round 2 on")
        all_ratios = [r for d in history.decisions if d.candidate_id == seat.participant_id
                      and own_decision(seat.kind, d.return_decided_by, d.return_timed_out)
                      and (r := _return_ratio(d)) is not None]
        changes = [r for r in pitches.get(seat.participant_id, []) if not r["change_reason"]]
        out.append({**history.group, **_seat_part(seat),
                    "mean_return_ratio": _mean(all_ratios), "n_returns": len(all_ratios),
                    "n_lagged_returns": len(obs), "n_lag_chosen": sum(chosen),
                    "slope_lag_sent": slope, "slope_lag_sent_reason": slope_reason,
                    "effect_lag_chosen": effect, "effect_lag_chosen_reason": effect_reason,
                    "n_pitch_changes": len(changes),
                    "mean_pitch_similarity": _mean(r["similarity_to_previous"] for r in changes),
                    "mean_lexical_turnover": _mean(r["turnover_from_previous"] for r in changes),
                    "pitch_reason": "" if changes else "no two consecutive pitches of the seat's own with words"})
    return out


def stay_observations(history: History, selector: Seat) -> list[tuple[float, bool]]:
    """(return ratio the selector got in round t−1, whether it chose the same candidate in t) for each round t ≥ 2
    in which its own choices of t−1 and t both went to a candidate and the return of t−1 is decided with
    something sent (a default return counts: it is what the selector got)."""
    mine = {d.round: d for d in history.decisions if d.selector_id == selector.participant_id}
    out = []
    for rnd, d in sorted(mine.items()):
        before = mine.get(rnd - 1)
        if before is None or d.candidate_id is None or before.candidate_id is None:
            continue
        if not (own_decision(selector.kind, d.decided_by, d.timed_out)
                and own_decision(selector.kind, before.decided_by, before.timed_out)):
            continue
        ratio = _return_ratio(before)
        if ratio is not None:
            out.append((ratio, d.candidate_id == before.candidate_id))
    return out


def selector_rows(history: History) -> list[dict[str, Any]]:
    """One row per selector seat: does it stay with a candidate who returned a lot (win-stay, lose-shift)?
    Observations: rounds t ≥ 2 in which the selector's own choice in t−1 went to a candidate whose return to
    them is decided with something sent, and its own choice in t chose a candidate."""
    out = []
    for seat in sorted((s for s in history.seats if s.role == "selector"), key=lambda s: s.seat):
        obs = stay_observations(history, seat)
        ratios, stays = [o[0] for o in obs], [o[1] for o in obs]
        slope, reason = ols_slope(ratios, [float(s) for s in stays])
        out.append({**history.group, **_seat_part(seat), "n_pairs": len(stays),
                    "stay_rate": sum(stays) / len(stays) if stays else None,
                    "slope_stay_on_lag_ratio": slope, "slope_stay_on_lag_ratio_reason": reason})
    return out


def group_round_rows(history: History) -> list[dict[str, Any]]:
    """One row per round × selector kind (human, bot, all; a kind only if the group has selectors of it):
    concentration of the counted choices over the group's candidates and its persistence from round t−1."""
    kinds = {s.participant_id: s.kind for s in history.seats if s.role == "selector"}
    candidates = sorted((s for s in history.seats if s.role == "candidate"), key=lambda s: s.seat)
    index = {s.participant_id: i for i, s in enumerate(candidates)}
    present = [k for k in SELECTOR_KINDS if k == "all" or k in kinds.values()]
    counts: dict[tuple[int, str], list[int]] = {}
    rounds = sorted({d.round for d in history.decisions})
    for rnd in rounds:
        for k in present:
            counts[(rnd, k)] = [0] * len(candidates)
    for d in history.decisions:
        kind = kinds.get(d.selector_id)
        if kind is None or d.candidate_id not in index or not own_decision(kind, d.decided_by, d.timed_out):
            continue
        for k in (kind, "all"):
            if k in present:
                counts[(d.round, k)][index[d.candidate_id]] += 1
    out = []
    for rnd in rounds:
        for k in present:
            current = counts[(rnd, k)]
            top, hhi = concentration(current)
            if rnd - 1 not in rounds:
                rho, reason = None, "first round" if rnd < 2 else "no choices stored for the previous round"
            else:
                rho, reason = rank_persistence(counts[(rnd - 1, k)], current)
            out.append({**history.group, "round": rnd, "round_complete": rnd <= history.settled_through,
                        "selector_kind": k, "n_choices": sum(current), "n_candidates": len(candidates),
                        "top_share": top, "hhi": hhi, "spearman_with_previous": rho, "spearman_reason": reason})
    return out


# ---- summaries by arm (the staff report) ----------------------------------------------------------------

def pooled_slope(xs: Sequence[float], ys: Sequence[float], clusters: Sequence[Any]) -> dict[str, Any]:
    """The OLS slope of y on x (with an intercept) pooled over every unit of an arm, its standard error clustered
    (CR2, with Student's t on the Bell–McCaffrey degrees of freedom: experiment.inference.CR2, the analysis'
    small-cluster method) and the 95 % interval; ``error`` says why it is empty (fewer than two clusters, no
    variation in x). Clusters are groups: the seats of one group react to the same people."""
    import numpy as np

    from experiment.inference import CR2

    codes = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
    out: dict[str, Any] = {"estimate": None, "se": None, "df": None, "low": None, "high": None, "p": None,
                           "n": len(xs), "n_clusters": len(codes), "error": ""}
    if len(codes) < 2:
        out["error"] = f"fewer than two groups ({len(codes)})"
        return out
    x = np.asarray(xs, dtype=float)
    if np.ptp(x) == 0:
        out["error"] = "the predictor does not vary"
        return out
    design = np.column_stack([np.ones_like(x), x])
    y = np.asarray(ys, dtype=float)
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    try:
        cr2 = CR2(weighted_design=design, working_residuals=y - design @ beta,
                  clusters=np.array([codes[c] for c in clusters]))
        se, df = cr2.contrast([0.0, 1.0])
        p, low, high = cr2.test([0.0, 1.0], estimate=float(beta[1]))
    except np.linalg.LinAlgError as exc:
        out["error"] = f"the clustered variance could not be computed: {exc}"
        return out
    out.update(estimate=float(beta[1]), se=se, df=df, low=low, high=high, p=p)
    return out


def summarise(rows: Iterable[Mapping[str, Any]], *, by: Sequence[str], measures: Sequence[str]) -> list[dict[str, Any]]:
    """Per combination of ``by`` (in first-seen order): the number of rows, and for each measure the mean of
    its non-empty values and how many there were (``n_<measure>``)."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    out = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(by, key, strict=True)) | {"n": len(members)}
        for m in measures:
            values = [r[m] for r in members if r[m] is not None]
            entry[m] = _mean(float(v) for v in values)
            entry[f"n_{m}"] = len(values)
        out.append(entry)
    return out


# ---- the database -----------------------------------------------------------------------------------------

BATCH_GROUPS = 200


def histories(scope: Any, *, batch: int = BATCH_GROUPS) -> Iterator[History]:
    """The :class:`History` of every group in ``scope`` (an export Scope), ordered by session and group number,
    read ``batch`` groups at a time."""
    from experiment.models import Choice, Group, Message, Participant

    groups = (Group.objects.filter(scope.q("session")).order_by("session_id", "number")
              .values_list("id", "session__experiment__slug", "session_id", "number", "condition__name", "status",
                           "round_number", "phase", "session__experiment__n_rounds"))
    rows = list(groups)
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        ids = [r[0] for r in chunk]
        seats: dict[int, list[Seat]] = {}
        for pk, gid, seat, role, kind, controller in (
                Participant.objects.filter(group_id__in=ids).exclude(role="")
                .values_list("id", "group_id", "seat", "role", "kind", "controller")):
            seats.setdefault(gid, []).append(Seat(pk, seat, role, kind, controller))
        decisions: dict[int, list[Decision]] = {}
        for gid, *values in (Choice.objects.filter(group_id__in=ids).order_by("round_number", "selector_id")
                             .values_list("group_id", "round_number", "selector_id", "candidate_id", "sent", "multiplied",
                                          "timed_out", "decided_by", "return_decision__returned",
                                          "return_decision__timed_out", "return_decision__decided_by")):
            *head, returned, r_timed_out, r_by = values
            decisions.setdefault(gid, []).append(Decision(*head, returned=returned, return_timed_out=bool(r_timed_out),
                                                          return_decided_by=r_by or ""))
        pitches: dict[int, list[Pitch]] = {}
        for gid, *values in (Message.objects.filter(group_id__in=ids).order_by("round_number", "candidate_id")
                             .values_list("group_id", "round_number", "candidate_id", "text", "timed_out", "decided_by")):
            pitches.setdefault(gid, []).append(Pitch(*values))
        for gid, slug, session_id, number, condition, status, round_number, phase, n_rounds in chunk:
            yield History(
                group={"experiment": slug, "session_id": session_id, "group_id": gid, "group_number": number,
                       "condition": condition},
                seats=seats.get(gid, []), decisions=decisions.get(gid, []), pitches=pitches.get(gid, []),
                settled_through=settled_through(status=status, round_number=round_number, phase=phase, n_rounds=n_rounds))


# ---- the export tables ------------------------------------------------------------------------------------

GROUP_COLUMNS: list[tuple[str, str, str, str]] = [
    ("experiment", "string", "", "Experiment: short unique identifier of the experiment."),
    ("session_id", "integer", "", "Session id (see the admin / API)."),
    ("group_id", "integer", "", "Group id: one mini-society playing together through all rounds."),
    ("group_number", "integer", "", "Group number within the session, from 1."),
    ("condition", "string", "", "Condition (treatment arm) of the group."),
]
ROUND_COLUMNS: list[tuple[str, str, str, str]] = [
    ("round", "integer", "", "Round number, from 1."),
    ("round_complete", "boolean", "", "True when the round is settled (its return phase has closed); False for a "
                                      "round still being played when the export was made."),
]
SEAT_COLUMNS: list[tuple[str, str, str, str]] = [
    ("participant_id", "integer", "", "Participant id of the seat (participants.participant_id)."),
    ("seat", "string", "", "Seat letter of the seat."),
    ("kind", "string", "", "Kind of the seat by design: human or bot (the tables of both kinds sit side by side)."),
    ("controller", "string", "", "What plays the seat at export time: person, synthetic, scripted or llm."),
]
OWN = ("the seat's own decisions: not defaults applied at a deadline and, in a human seat, not made by a bot or "
       "synthetic filler playing it")

CANDIDATE_COLUMNS = GROUP_COLUMNS + SEAT_COLUMNS + [
    ("mean_return_ratio", "number", "share 0..1", f"Mean of returned / multiplied over the seat's returns ({OWN}) "
                                                  "with something sent, all rounds; empty without one."),
    ("n_returns", "integer", "", "Returns behind mean_return_ratio."),
    ("n_lagged_returns", "integer", "", "Returns from round 2 on behind slope_lag_sent and effect_lag_chosen: the "
                                        "seat's own returns to a selector who sent something in round t."),
    ("n_lag_chosen", "integer", "", "Of these, returns to a selector who had also chosen this seat in round t−1."),
    ("slope_lag_sent", "number", "share per point",
     "OLS slope (with intercept) of the return ratio to a selector in round t on the points that selector sent this "
     "seat in round t−1 (0 when they chose another candidate or nobody): the change in the share returned per point "
     f"received the round before. Empty when fewer than {MIN_SLOPE_OBS} returns or the lagged amount never varies."),
    ("slope_lag_sent_reason", "string", "", "Why slope_lag_sent is empty; empty when it is given."),
    ("effect_lag_chosen", "number", "share 0..1",
     "Mean return ratio to selectors who had chosen this seat in round t−1 minus the mean to selectors who had not "
     "(the OLS slope on a 0/1 indicator). Empty when either set is empty."),
    ("effect_lag_chosen_reason", "string", "", "Why effect_lag_chosen is empty; empty when it is given."),
    ("n_pitch_changes", "integer", "", "Consecutive-round pitch pairs with words behind the two pitch means "
                                       "(adaptation_pitches rows with an empty change_reason)."),
    ("mean_pitch_similarity", "number", "0..1", "Mean of adaptation_pitches.similarity_to_previous over the seat's rounds."),
    ("mean_lexical_turnover", "number", "share 0..1", "Mean of adaptation_pitches.turnover_from_previous over the seat's rounds."),
    ("pitch_reason", "string", "", "Why the two pitch means are empty; empty when they are given."),
]
PITCH_COLUMNS = GROUP_COLUMNS + ROUND_COLUMNS + SEAT_COLUMNS + [
    ("own_pitch", "boolean", "", f"True when the pitch is {OWN}; False when it is a timeout or a takeover's."),
    ("n_words", "integer", "words", "Word tokens of the pitch (NFKC, case-folded, runs of letters and digits); empty "
                                    "when own_pitch is False."),
    ("n_types", "integer", "words", "Distinct words of the pitch; empty when own_pitch is False."),
    ("similarity_to_previous", "number", "0..1",
     "Cosine similarity of the word-count vectors of this pitch and the seat's pitch in round t−1 (1: same words in the "
     "same proportions; 0: no word in common). Empty when change_reason says why."),
    ("turnover_from_previous", "number", "share 0..1",
     "Lexical turnover: share of the distinct words of this pitch that the pitch of round t−1 did not use. Empty when "
     "change_reason says why."),
    ("change_reason", "string", "", "Why the two change measures are empty (first round, no pitch of the seat's own, "
                                    "no words); empty when they are given."),
]
SELECTOR_COLUMNS = GROUP_COLUMNS + SEAT_COLUMNS + [
    ("n_pairs", "integer", "", "Rounds t ≥ 2 in which the selector chose a candidate in t − 1 and in t (its own "
                               "decisions both times) and the return of t − 1 is decided with something sent."),
    ("stay_rate", "number", "share 0..1", "Share of these rounds in which it chose the same candidate as in t − 1."),
    ("slope_stay_on_lag_ratio", "number", "per unit of ratio",
     "OLS slope (linear probability) of staying with the candidate of round t − 1 on the return ratio that candidate "
     "gave this selector in t − 1 (defaults at the deadline included: they are what the selector got). Positive: it "
     f"sticks with partners who return more. Empty when fewer than {MIN_SLOPE_OBS} pairs or the ratio never varies."),
    ("slope_stay_on_lag_ratio_reason", "string", "", "Why slope_stay_on_lag_ratio is empty; empty when it is given."),
]
GROUP_ROUND_COLUMNS = GROUP_COLUMNS + ROUND_COLUMNS + [
    ("selector_kind", "string", "", "Whose choices are counted: human selector seats, bot selector seats, or all "
                                    "(a kind only appears in groups with selectors of it). Counted: a candidate "
                                    f"chosen, {OWN}."),
    ("n_choices", "integer", "", "Counted choices."),
    ("n_candidates", "integer", "", "Candidate seats of the group (every one enters the shares, chosen or not)."),
    ("top_share", "number", "share 0..1", "Share of the counted choices that went to the most-chosen candidate; "
                                          "empty without choices."),
    ("hhi", "number", "0..1", "Herfindahl–Hirschman index: sum over candidates of their squared choice share (1 / "
                              "n_candidates when choices are spread evenly, 1 when all go to one); empty without choices."),
    ("spearman_with_previous", "number", "-1..1",
     "Spearman rank correlation (ties at average ranks) of the candidates' counted-choice counts in round t − 1 and "
     "round t: persistence of who is popular. Empty when spearman_reason says why."),
    ("spearman_reason", "string", "", "Why spearman_with_previous is empty (first round, equal counts for every "
                                      "candidate in a round, fewer than two candidates); empty when it is given."),
]


@dataclass(frozen=True)
class DerivedSpec:
    name: str
    row: str
    columns: list[tuple[str, str, str, str]]
    build: Callable[[History], list[dict[str, Any]]]
    note: str = ""


SPECS: list[DerivedSpec] = [
    DerivedSpec("adaptation_candidates", "one row per candidate seat (human or bot)", CANDIDATE_COLUMNS, candidate_rows,
                "Computed from the choices, returns and messages (experiment/adaptation.py; definitions in "
                "docs/analysis.md, \"Adaptation\")."),
    DerivedSpec("adaptation_pitches", "one row per candidate seat × round with a stored pitch", PITCH_COLUMNS, pitch_rows,
                "Computed from the messages (experiment/adaptation.py)."),
    DerivedSpec("adaptation_selectors", "one row per selector seat (human or bot)", SELECTOR_COLUMNS, selector_rows,
                "Computed from the choices and returns (experiment/adaptation.py)."),
    DerivedSpec("adaptation_groups", "one row per group × round × selector kind", GROUP_ROUND_COLUMNS, group_round_rows,
                "Computed from the choices (experiment/adaptation.py)."),
]


def spec_rows(spec: DerivedSpec, scope: Any) -> Iterator[tuple]:
    """The rows of one derived table in scope, as tuples in column order."""
    names = [c[0] for c in spec.columns]
    for history in histories(scope):
        for row in spec.build(history):
            yield tuple(row[n] for n in names)


# ---- the staff report ---------------------------------------------------------------------------------------

CANDIDATE_MEASURES = ("slope_lag_sent", "effect_lag_chosen", "mean_return_ratio", "mean_pitch_similarity",
                      "mean_lexical_turnover")
SELECTOR_MEASURES = ("stay_rate", "slope_stay_on_lag_ratio")
GROUP_MEASURES = ("top_share", "hhi", "spearman_with_previous")


def summary(scope: Any, *, conditions_order: Mapping[str, int] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Means of the per-unit measures by arm (condition) and kind, for the staff report: candidate seats and
    selector seats by condition × kind, group-rounds by condition × selector kind (settled rounds only, so a
    round still being played does not pull the concentration down). Arms in ``conditions_order``, then by name."""
    candidates: list[dict[str, Any]] = []
    selectors: list[dict[str, Any]] = []
    groups: list[dict[str, Any]] = []
    # (condition, kind, what) → (x, y, group) of every observation behind the pooled slopes
    pooled: dict[tuple[str, str, str], tuple[list[float], list[float], list[int]]] = {}

    def add(key: tuple[str, str, str], x: float, y: float, group_id: int) -> None:
        xs, ys, cs = pooled.setdefault(key, ([], [], []))
        xs.append(x)
        ys.append(y)
        cs.append(group_id)

    for history in histories(scope):
        candidates += candidate_rows(history)
        selectors += selector_rows(history)
        groups += [r for r in group_round_rows(history) if r["round_complete"]]
        arm, gid = history.group["condition"], history.group["group_id"]
        for seat in history.seats:
            if seat.role == "candidate":
                for sent, chosen, ratio in responsiveness_observations(history, seat):
                    add((arm, seat.kind, "return ratio on lagged sent"), sent, ratio, gid)
                    add((arm, seat.kind, "return ratio on lagged chosen"), float(chosen), ratio, gid)
            else:
                for ratio, stay in stay_observations(history, seat):
                    add((arm, seat.kind, "stay on lagged return ratio"), ratio, float(stay), gid)
    arms = dict(conditions_order or {})
    kinds = {k: i for i, k in enumerate(SELECTOR_KINDS)}

    def ordered(rows: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
        return sorted(rows, key=lambda r: (arms.get(r["condition"], len(arms)), r["condition"],
                                           kinds.get(r[kind], len(kinds))))

    return {
        "candidates": summarise(ordered(candidates, "kind"), by=("condition", "kind"), measures=CANDIDATE_MEASURES),
        "selectors": summarise(ordered(selectors, "kind"), by=("condition", "kind"), measures=SELECTOR_MEASURES),
        "groups": summarise(ordered(groups, "selector_kind"), by=("condition", "selector_kind"), measures=GROUP_MEASURES),
        "pooled": [{"condition": arm, "kind": kind, "slope": what, **pooled_slope(*pooled[(arm, kind, what)])}
                   for arm, kind, what in sorted(pooled, key=lambda k: (arms.get(k[0], len(arms)), k[0],
                                                                         kinds.get(k[1], len(kinds)), k[2]))],
    }
