"""Adaptation metrics: each measure on a constructed history whose value is worked out by hand, the edge cases
that leave a value empty with a reason, and the exported tables of a session built row by row."""

from __future__ import annotations

import csv
import io
import json
import math
import zipfile

import pytest

from experiment import adaptation as ad
from experiment import analysis, export
from experiment.adaptation import Decision, History, Pitch, Seat
from experiment.export import Options, Scope
from experiment.models import Choice, Group, Message, Participant, Return
from tests import factories
from tests.experiment import playthrough

P = Participant
GROUP = {"experiment": "x", "session_id": 1, "group_id": 7, "group_number": 1, "condition": "hidden"}


# ---- the measures, on values known by hand ------------------------------------------------------------------

def test_words_fold_case_and_split_on_punctuation() -> None:
    assert ad.words("Trust ME: I'll send 10 points!") == ["trust", "me", "i", "ll", "send", "10", "points"]
    assert ad.words("ＡＢＣ snake_case") == ["abc", "snake", "case"]  # NFKC folds full-width letters; _ splits
    assert ad.words(" ... !") == []


def test_cosine_similarity_of_known_strings() -> None:
    # "a a b" = (2, 1, 0), "a b c" = (1, 1, 1) over (a, b, c): 3 / (√5 · √3)
    assert ad.cosine_similarity(ad.words("a a b"), ad.words("a b c")) == pytest.approx(3 / math.sqrt(15))
    assert ad.cosine_similarity(["x", "y"], ["y", "x"]) == pytest.approx(1.0)
    assert ad.cosine_similarity(["x"], ["y"]) == 0.0
    assert ad.cosine_similarity([], ["y"]) is None and ad.cosine_similarity(["y"], []) is None


def test_lexical_turnover_counts_new_types() -> None:
    # types now {a, b, c, d}, before {a, b}: c and d are new → 2 / 4
    assert ad.lexical_turnover(ad.words("a b b"), ad.words("a b c d d")) == 0.5
    assert ad.lexical_turnover(["a"], ["a", "a"]) == 0.0
    assert ad.lexical_turnover(["a"], ["b"]) == 1.0
    assert ad.lexical_turnover([], ["b"]) is None


def test_ols_slope_on_exactly_linear_data_and_its_edge_cases() -> None:
    slope, reason = ad.ols_slope([0, 1, 2, 5], [0.1 + 0.05 * x for x in (0, 1, 2, 5)])
    assert slope == pytest.approx(0.05) and reason == ""
    assert ad.ols_slope([1, 2], [0.3, 0.4]) == (None, "fewer than 3 observations (2)")
    assert ad.ols_slope([3, 3, 3], [0.1, 0.5, 0.9]) == (None, "the predictor does not vary")
    assert ad.ols_slope([], []) == (None, "fewer than 3 observations (0)")


def test_mean_difference_is_the_slope_on_an_indicator() -> None:
    assert ad.mean_difference([0.6, 0.4, 0.2], [True, True, False]) == (pytest.approx(0.3), "")
    assert ad.mean_difference([0.6, 0.4], [True, True]) == (None, "no observation with the predictor false")
    assert ad.mean_difference([0.6], [False]) == (None, "no observation with the predictor true")


def test_concentration_top_share_and_hhi() -> None:
    assert ad.concentration([2, 1, 1]) == (0.5, 0.375)  # shares 0.5 / 0.25 / 0.25
    assert ad.concentration([0, 4, 0]) == (1.0, 1.0)
    assert ad.concentration([1, 1, 1, 1]) == (0.25, 0.25)
    assert ad.concentration([0, 0]) == (None, None)


def test_rank_persistence_spearman_with_ties() -> None:
    assert ad.rank_persistence([3, 2, 1], [3, 2, 1]) == (pytest.approx(1.0), "")
    assert ad.rank_persistence([3, 2, 1], [1, 2, 3]) == (pytest.approx(-1.0), "")
    # average ranks (2.5, 2.5, 1) and (1.5, 3, 1.5): Σdxdy = 0.75, Σdx² = Σdy² = 1.5 → 0.5
    assert ad.rank_persistence([1, 1, 0], [0, 2, 0]) == (pytest.approx(0.5), "")
    assert ad.rank_persistence([1, 1, 1], [0, 2, 1])[0] is None
    assert ad.rank_persistence([0, 2, 1], [2, 2, 2]) == (None, "every candidate was chosen equally often in this round")
    assert ad.rank_persistence([1], [2]) == (None, "fewer than two candidates")


def test_rank_persistence_agrees_with_scipy() -> None:
    import random

    from scipy.stats import spearmanr

    rng = random.Random(5)
    assert ad.average_ranks([1, 1, 0]) == [2.5, 2.5, 1.0]
    for _ in range(200):
        n = rng.randint(2, 7)
        a, b = [rng.randint(0, 3) for _ in range(n)], [rng.randint(0, 3) for _ in range(n)]
        rho, _ = ad.rank_persistence(a, b)
        if len(set(a)) > 1 and len(set(b)) > 1:
            assert rho == pytest.approx(spearmanr(a, b).statistic)
        else:
            assert rho is None


def test_settled_through_follows_round_complete() -> None:
    assert ad.settled_through(status="finished", round_number=4, phase="belief", n_rounds=4) == 4
    assert ad.settled_through(status="playing", round_number=3, phase="return", n_rounds=4) == 2
    assert ad.settled_through(status="playing", round_number=3, phase="feedback", n_rounds=4) == 3


# ---- per-table rows of one constructed group ----------------------------------------------------------------
# Selectors: S1 (human), S2 (bot). Candidates: A (human), B (bot), C (bot, never chosen), multiplier 3.
# S1 chooses B every round, sending 2, 4, 6, 8; S2 chooses A, B, A, A, sending 5.
# B returns exactly lagged sent / 12 of what it gets; A returns 5, 3, 9 of 15.

A, B, C, S1, S2 = 11, 12, 13, 21, 22
SEATS = [Seat(A, "A", "candidate", "human", "person"), Seat(B, "B", "candidate", "bot", "scripted"),
         Seat(C, "C", "candidate", "bot", "scripted"), Seat(S1, "S1", "selector", "human", "person"),
         Seat(S2, "S2", "selector", "bot", "scripted")]
# (round, selector, candidate, sent, returned)
PLAYS = [(1, S1, B, 2, 3), (2, S1, B, 4, 2), (3, S1, B, 6, 6), (4, S1, B, 8, 12),
         (1, S2, A, 5, 5), (2, S2, B, 5, 0), (3, S2, A, 5, 3), (4, S2, A, 5, 9)]
PITCHES = {(B, 1): "Trust me, I return a lot", (B, 2): "trust me: i RETURN a lot", (B, 3): "send more, get more",
           (A, 1): "hello", (A, 3): "hello again", (C, 1): "", (C, 2): "...", (C, 3): "fine"}


def _decisions() -> list[Decision]:
    kinds = {s.participant_id: s for s in SEATS}
    return [Decision(round=r, selector_id=s, candidate_id=c, sent=sent, multiplied=3 * sent,
                     decided_by=kinds[s].controller, returned=back, return_decided_by=kinds[c].controller)
            for r, s, c, sent, back in PLAYS]


def _history(**changes) -> History:
    pitches = [Pitch(round=r, candidate_id=c, text=t, timed_out=t == "",
                     decided_by="" if t == "" else ("person" if c == A else "scripted")) for (c, r), t in PITCHES.items()]
    return History(group=dict(GROUP), seats=list(SEATS), decisions=changes.pop("decisions", _decisions()),
                   pitches=changes.pop("pitches", pitches), settled_through=changes.pop("settled_through", 4))


def _by(rows, *keys):
    return {tuple(r[k] for k in keys): r for r in rows}


def test_return_responsiveness_of_each_candidate() -> None:
    rows = _by(ad.candidate_rows(_history()), "seat")
    b = rows[("B",)]
    # B's lagged observations: (2, chosen, 1/6), (4, chosen, 1/3), (6, chosen, 1/2) from S1 and (0, not, 0) from S2.
    assert b["n_lagged_returns"] == 4 and b["n_lag_chosen"] == 3
    assert b["slope_lag_sent"] == pytest.approx(1 / 12) and b["slope_lag_sent_reason"] == ""
    assert b["effect_lag_chosen"] == pytest.approx(1 / 3) and b["effect_lag_chosen_reason"] == ""
    assert b["n_returns"] == 5 and b["mean_return_ratio"] == pytest.approx((0.5 + 1 / 6 + 1 / 3 + 0.5 + 0) / 5)
    a = rows[("A",)]
    # A: (0, not chosen, 3/15) in round 3 and (5, chosen, 9/15) in round 4: two points are too few for a slope.
    assert a["slope_lag_sent"] is None and a["slope_lag_sent_reason"] == "fewer than 3 observations (2)"
    assert a["effect_lag_chosen"] == pytest.approx(0.4) and a["kind"] == "human"
    c = rows[("C",)]
    assert c["n_returns"] == 0 and c["mean_return_ratio"] is None
    assert c["slope_lag_sent"] is None and c["effect_lag_chosen_reason"] == "no return from round 2 on"


def test_a_takeover_or_a_default_is_not_the_human_seats_response() -> None:
    decisions = [d if not (d.candidate_id == A and d.round == 4) else
                 Decision(**{**d.__dict__, "return_decided_by": "scripted"}) for d in _decisions()]
    a = _by(ad.candidate_rows(_history(decisions=decisions)), "seat")[("A",)]
    assert a["n_lagged_returns"] == 1 and a["effect_lag_chosen"] is None
    # a bot seat's decisions stay its own whoever is named; a timeout never is
    decisions = [d if not (d.candidate_id == B and d.round == 2) else
                 Decision(**{**d.__dict__, "return_timed_out": True}) for d in _decisions()]
    b = _by(ad.candidate_rows(_history(decisions=decisions)), "seat")[("B",)]
    assert b["n_lagged_returns"] == 2


def test_zero_sent_gives_no_return_ratio() -> None:
    decisions = [Decision(round=r, selector_id=S1, candidate_id=B, sent=0, multiplied=0, returned=0,
                          decided_by="person", return_decided_by="scripted") for r in (1, 2, 3, 4)]
    b = _by(ad.candidate_rows(_history(decisions=decisions)), "seat")[("B",)]
    assert b["n_returns"] == 0 and b["slope_lag_sent"] is None and b["mean_return_ratio"] is None


def test_pitch_changes() -> None:
    rows = _by(ad.pitch_rows(_history()), "seat", "round")
    assert rows[("B", 1)]["change_reason"] == "first round" and rows[("B", 1)]["similarity_to_previous"] is None
    same = rows[("B", 2)]  # the same words, recased and repunctuated
    assert same["similarity_to_previous"] == pytest.approx(1.0) and same["turnover_from_previous"] == 0.0
    new = rows[("B", 3)]
    assert new["similarity_to_previous"] == 0.0 and new["turnover_from_previous"] == 1.0
    assert new["n_words"] == 4 and new["n_types"] == 3
    assert rows[("A", 3)]["change_reason"] == "no pitch stored for the previous round"
    assert rows[("C", 2)]["change_reason"] == "no pitch of the seat's own in the previous round"  # C timed out in 1
    assert rows[("C", 1)]["own_pitch"] is False and rows[("C", 1)]["n_words"] is None
    assert rows[("C", 3)]["change_reason"] == "no words in the previous pitch"
    summary = _by(ad.candidate_rows(_history()), "seat")
    assert summary[("B",)]["n_pitch_changes"] == 2 and summary[("B",)]["mean_pitch_similarity"] == pytest.approx(0.5)
    assert summary[("B",)]["mean_lexical_turnover"] == pytest.approx(0.5)
    assert summary[("C",)]["mean_pitch_similarity"] is None and summary[("C",)]["pitch_reason"]


def test_no_pitches_at_all() -> None:
    rows = ad.candidate_rows(_history(pitches=[]))
    assert ad.pitch_rows(_history(pitches=[])) == []
    assert all(r["n_pitch_changes"] == 0 and r["mean_lexical_turnover"] is None and r["pitch_reason"] for r in rows)


def test_selectors_stay_with_reliable_partners() -> None:
    rows = _by(ad.selector_rows(_history()), "seat")
    s1 = rows[("S1",)]  # always stays with B whatever the return: slope 0
    assert s1["n_pairs"] == 3 and s1["stay_rate"] == 1.0 and s1["slope_stay_on_lag_ratio"] == pytest.approx(0.0)
    s2 = rows[("S2",)]  # (1/3, left), (0, left), (1/5, stayed): Sxy = 1/45, Sxx = 114/2025 → 15/38
    assert s2["n_pairs"] == 3 and s2["stay_rate"] == pytest.approx(1 / 3)
    assert s2["slope_stay_on_lag_ratio"] == pytest.approx(15 / 38) and s2["kind"] == "bot"


def test_concentration_and_persistence_by_round_and_selector_kind() -> None:
    rows = _by(ad.group_round_rows(_history()), "round", "selector_kind")
    assert len(rows) == 4 * 3
    # counts over (A, B, C): all r1 (1, 1, 0), r2 (0, 2, 0), r3 (1, 1, 0)
    r1, r2, r3 = rows[(1, "all")], rows[(2, "all")], rows[(3, "all")]
    assert (r1["top_share"], r1["hhi"], r1["n_choices"], r1["n_candidates"]) == (0.5, 0.5, 2, 3)
    assert r1["spearman_with_previous"] is None and r1["spearman_reason"] == "first round"
    assert (r2["top_share"], r2["hhi"]) == (1.0, 1.0) and r2["spearman_with_previous"] == pytest.approx(0.5)
    assert r3["spearman_with_previous"] == pytest.approx(0.5)
    # human selectors only (S1 → B every round): counts (0, 1, 0) every round, perfectly persistent
    assert rows[(2, "human")]["spearman_with_previous"] == pytest.approx(1.0) and rows[(2, "human")]["hhi"] == 1.0
    # the bot selector: (1, 0, 0) then (0, 1, 0): −0.5
    assert rows[(2, "bot")]["spearman_with_previous"] == pytest.approx(-0.5)


def test_defaults_are_not_counted_and_a_round_with_no_choices_is_empty() -> None:
    decisions = [Decision(round=1, selector_id=S1, candidate_id=A, sent=1, multiplied=3, timed_out=True),
                 Decision(round=1, selector_id=S2, candidate_id=None)]
    rows = _by(ad.group_round_rows(_history(decisions=decisions, settled_through=0)), "round", "selector_kind")
    assert rows[(1, "all")]["n_choices"] == 0 and rows[(1, "all")]["hhi"] is None
    assert rows[(1, "all")]["round_complete"] is False


def test_pooled_slope_estimate_and_clustered_error() -> None:
    exact = ad.pooled_slope([0, 2, 4, 1, 3, 5], [0.1 + 0.05 * x for x in (0, 2, 4, 1, 3, 5)], [1, 1, 2, 2, 3, 3])
    assert exact["estimate"] == pytest.approx(0.05) and exact["se"] == pytest.approx(0.0, abs=1e-12)
    assert exact["n"] == 6 and exact["n_clusters"] == 3 and exact["error"] == ""
    import numpy as np
    import statsmodels.api as sm

    xs, ys = [0.0, 1.0, 2.0, 3.0, 5.0, 8.0], [0.3, 0.2, 0.5, 0.4, 0.9, 0.7]
    # one observation per cluster: CR2 is HC2 (statsmodels computes it independently)
    single = ad.pooled_slope(xs, ys, list(range(6)))
    fit = sm.OLS(np.array(ys), sm.add_constant(np.array(xs))).fit(cov_type="HC2")
    assert single["estimate"] == pytest.approx(fit.params[1]) and single["se"] == pytest.approx(fit.bse[1])
    assert single["low"] < single["estimate"] < single["high"] and 0 < single["df"] <= 5
    assert ad.pooled_slope(xs, ys, [1] * 6)["error"] == "fewer than two groups (1)"
    assert ad.pooled_slope([2, 2, 2], [0.1, 0.2, 0.3], [1, 2, 3])["error"] == "the predictor does not vary"


def test_stay_observations_use_the_return_the_selector_got() -> None:
    assert ad.stay_observations(_history(), SEATS[4]) == [(pytest.approx(1 / 3), False), (0.0, False),
                                                           (pytest.approx(0.2), True)]
    # a default return is what the selector got: it counts; a default choice is not the selector's
    decisions = [d if not (d.selector_id == S2 and d.round == 3) else Decision(**{**d.__dict__, "timed_out": True})
                 for d in _decisions()]
    assert ad.stay_observations(_history(decisions=decisions), SEATS[4]) == [(pytest.approx(1 / 3), False)]


def test_summarise_means_of_present_values() -> None:
    rows = [{"condition": "h", "kind": "bot", "m": 1.0}, {"condition": "h", "kind": "bot", "m": None},
            {"condition": "h", "kind": "bot", "m": 3.0}, {"condition": "d", "kind": "bot", "m": None}]
    out = ad.summarise(rows, by=["condition", "kind"], measures=["m"])
    assert out == [{"condition": "h", "kind": "bot", "n": 3, "m": 2.0, "n_m": 2},
                   {"condition": "d", "kind": "bot", "n": 1, "m": None, "n_m": 0}]


# ---- the database: a session built row by row, then exported ------------------------------------------------

def _build_session() -> tuple[Group, dict[int, Participant]]:
    experiment = factories.experiment_create(n_selectors=2, n_bot_selectors=1, n_candidates=3, n_bot_candidates=2,
                                             n_rounds=4)
    session = factories.session_create(experiment)
    group = Group.objects.create(session=session, condition=experiment.conditions.get(name="hidden"), number=1,
                                 status=Group.Status.FINISHED, round_number=4, phase="feedback")
    made = {}
    for s in SEATS:
        made[s.participant_id] = Participant.objects.create(session=session, group=group, seat=s.seat, role=s.role,
                                                            kind=s.kind, controller=s.controller, status=P.Status.FINISHED)
    for r, s, c, sent, back in PLAYS:
        choice = Choice.objects.create(group=group, round_number=r, selector=made[s], candidate=made[c], sent=sent,
                                       multiplied=3 * sent, decided_by=made[s].controller)
        Return.objects.create(choice=choice, candidate=made[c], available=3 * sent, returned=back,
                              decided_by=made[c].controller)
    for (c, r), text in PITCHES.items():
        Message.objects.create(group=group, round_number=r, candidate=made[c], text=text, timed_out=text == "",
                               decided_by="" if text == "" else made[c].controller)
    return group, made


@pytest.mark.django_db
def test_exported_adaptation_tables_of_a_built_session() -> None:
    group, made = _build_session()
    out = io.BytesIO()
    export.bundle_write(scope=Scope.session(group.session_id), options=Options(), out=out)
    with zipfile.ZipFile(io.BytesIO(out.getvalue())) as z:
        files = {n: z.read(n).decode() for n in z.namelist()}
        manifest = json.loads(files["manifest.json"])
    read = {name: list(csv.DictReader(io.StringIO(files[f"{name}.csv"]))) for name in
            ("adaptation_candidates", "adaptation_pitches", "adaptation_selectors", "adaptation_groups")}
    b = {r["seat"]: r for r in read["adaptation_candidates"]}["B"]
    assert b["participant_id"] == str(made[B].pk) and b["group_id"] == str(group.pk) and b["condition"] == "hidden"
    assert float(b["slope_lag_sent"]) == pytest.approx(1 / 12) and float(b["effect_lag_chosen"]) == pytest.approx(1 / 3)
    a = {r["seat"]: r for r in read["adaptation_candidates"]}["A"]
    assert a["slope_lag_sent"] == "" and a["slope_lag_sent_reason"] == "fewer than 3 observations (2)"
    groups = {(r["round"], r["selector_kind"]): r for r in read["adaptation_groups"]}
    assert float(groups[("2", "all")]["spearman_with_previous"]) == pytest.approx(0.5)
    assert groups[("1", "all")]["hhi"] == "0.5" and groups[("4", "all")]["round_complete"] == "True"
    s2 = {r["seat"]: r for r in read["adaptation_selectors"]}["S2"]
    assert float(s2["slope_stay_on_lag_ratio"]) == pytest.approx(15 / 38)
    assert len(read["adaptation_pitches"]) == len(PITCHES)
    for name, rows in read.items():
        assert manifest["files"][f"{name}.csv"]["rows"] == len(rows)
    # JSON Lines: the same values, typed
    jsonl = export.derived_chunks(export.derived_table("adaptation_candidates"), scope=Scope.session(group.session_id),
                                  options=Options(format="jsonl"))
    records = [json.loads(line) for line in b"".join(jsonl).decode().splitlines()]
    pooled = analysis.adaptation_context(scope=Scope.session(group.session_id))["pooled"]
    assert pooled and all(row[-1] == "fewer than two groups (1)" for row in pooled)  # one group: no clustered SE
    assert {r["seat"]: r for r in records}["A"]["slope_lag_sent"] is None
    assert {r["seat"]: r for r in records}["B"]["n_lag_chosen"] == 3


@pytest.mark.django_db
def test_played_session_tables_follow_the_stored_rows_and_the_report_shows_them() -> None:
    session = playthrough.session_played()
    scope = Scope.session(session.pk)
    candidates = Participant.objects.filter(session=session, role=P.Role.CANDIDATE)
    rows = list(export.derived_table("adaptation_candidates").rows(scope))
    assert len(rows) == candidates.count()
    assert len(list(export.derived_table("adaptation_pitches").rows(scope))) == Message.objects.filter(
        group__session=session).count()
    # the bundle's other tables are byte-identical with and without the derived ones
    plain = b"".join(export.encoded_chunks(export.table("choices"), scope=scope, options=Options()))
    out = io.BytesIO()
    export.bundle_write(scope=scope, options=Options(), out=out)
    with zipfile.ZipFile(io.BytesIO(out.getvalue())) as z:
        assert z.read("choices.csv") == plain
    context = analysis.report_context(scope=scope, title="t")
    html = analysis.report_html(scope=scope, title="t")
    assert "Adaptation" in html and context["adaptation"]["candidates"]
    kinds = {r[1] for r in context["adaptation"]["candidates"]}
    assert kinds == {"human", "bot"}


def test_derived_table_names_are_refused_clearly() -> None:
    with pytest.raises(export.ExportError, match="No derived table"):
        export.derived_table("nope")
