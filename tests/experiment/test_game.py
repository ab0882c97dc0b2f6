"""The pure game rules (experiment/game.py), without a database: payoffs, validation of single
actions, the phase sequence, seat plans, condition balance, candidate order, labels, defaults and
design checks. Properties are checked with hypothesis where a rule holds for every input."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiment import game
from experiment.game import Params, Phase, RuleError

DEFAULT = Params()
ENDOWMENTS = st.integers(min_value=1, max_value=1000)
MULTIPLIERS = st.integers(min_value=1, max_value=10)


def _code(fn, *args, **kwargs) -> str:
    with pytest.raises(RuleError) as info:
        fn(*args, **kwargs)
    assert info.value.message  # every refusal says what is wrong
    return info.value.code


# ---- payoffs -------------------------------------------------------------------------------------

def test_payoffs_of_a_worked_round() -> None:
    # S1 sends 4 to A (A gets 12, returns 5); S2 sends 10 to A (30, returns 0); S3 sends 7 to B (21, returns 21).
    transfers = [game.Transfer("S1", "A", 4, 5), game.Transfer("S2", "A", 10, 0), game.Transfer("S3", "B", 7, 21)]
    payoffs = game.round_payoffs(transfers, ["S1", "S2", "S3"], ["A", "B", "C", "D"], DEFAULT)
    assert payoffs == {"S1": 11, "S2": 0, "S3": 24, "A": 12 - 5 + 30 - 0, "B": 0, "C": 0, "D": 0}


def test_unchosen_candidates_earn_the_base_and_a_selector_without_choice_keeps_the_endowment() -> None:
    params = Params(unchosen_base=3)
    payoffs = game.round_payoffs([game.Transfer("S1", None, 0, 0)], ["S1", "S2"], ["A", "B"], params)
    assert payoffs == {"S1": 10, "S2": 10, "A": 3, "B": 3}


def test_a_chosen_candidate_earns_its_net_transfers_not_the_base() -> None:
    params = Params(unchosen_base=3)
    payoffs = game.round_payoffs([game.Transfer("S1", "A", 2, 6)], ["S1"], ["A", "B"], params)
    # A kept nothing: a chosen candidate earns multiplier × sent − returned even when that is below the base.
    assert payoffs["A"] == 0 and payoffs["B"] == 3 and payoffs["S1"] == 14


@st.composite
def rounds(draw):
    endowment, multiplier = draw(ENDOWMENTS), draw(MULTIPLIERS)
    params = Params(endowment=endowment, multiplier=multiplier, unchosen_base=draw(st.integers(0, 20)))
    n_sel, n_cand = draw(st.integers(1, 6)), draw(st.integers(2, 6))
    selectors = [f"S{i + 1}" for i in range(n_sel)]
    candidates = [chr(ord("A") + i) for i in range(n_cand)]
    transfers = []
    for s in selectors:
        if draw(st.booleans()):
            c = draw(st.sampled_from(candidates))
            sent = draw(st.integers(0, endowment))
            transfers.append(game.Transfer(s, c, sent, draw(st.integers(0, sent * multiplier))))
        elif draw(st.booleans()):
            transfers.append(game.Transfer(s, None, 0, 0))
    return params, selectors, candidates, transfers


@given(rounds())
def test_payoff_formulas_hold_for_every_round(case) -> None:
    params, selectors, candidates, transfers = case
    payoffs = game.round_payoffs(transfers, selectors, candidates, params)
    assert set(payoffs) == set(selectors) | set(candidates)
    by_selector = {t.selector: t for t in transfers}
    for s in selectors:
        t = by_selector.get(s)
        assert payoffs[s] == (params.endowment - t.sent + t.returned if t else params.endowment)
        assert game.selector_payoff(t.sent if t else 0, t.returned if t else 0, params) == payoffs[s]
    for c in candidates:
        mine = [t for t in transfers if t.candidate == c]
        expected = sum(params.multiplier * t.sent - t.returned for t in mine) if mine else params.unchosen_base
        assert payoffs[c] == expected
        assert payoffs[c] >= 0
    # Points are created only by the multiplier: total = S·E + (m − 1)·Σsent + base for the unchosen.
    chosen = {t.candidate for t in transfers if t.candidate}
    total_sent = sum(t.sent for t in transfers)
    assert sum(payoffs.values()) == (len(selectors) * params.endowment + (params.multiplier - 1) * total_sent
                                     + params.unchosen_base * len(set(candidates) - chosen))


@given(st.integers(0, 1000), MULTIPLIERS)
def test_multiplied(sent: int, multiplier: int) -> None:
    assert game.multiplied(sent, Params(multiplier=multiplier)) == sent * multiplier


# ---- amounts ---------------------------------------------------------------------------------------

@given(ENDOWMENTS, st.data())
def test_every_amount_from_zero_to_the_endowment_is_accepted(endowment: int, data) -> None:
    amount = data.draw(st.integers(0, endowment))
    params = Params(endowment=endowment)
    assert game.check_sent(amount, params) == amount
    assert game.check_sent(str(amount), params) == amount
    assert game.check_sent(float(amount), params) == amount


@given(ENDOWMENTS, st.integers(1, 10**6))
def test_amounts_outside_zero_to_the_endowment_are_refused(endowment: int, excess: int) -> None:
    params = Params(endowment=endowment)
    assert _code(game.check_sent, -excess, params) == "amount_out_of_range"
    assert _code(game.check_sent, endowment + excess, params) == "amount_out_of_range"
    assert _code(game.check_sent, str(-excess), params) == "amount_out_of_range"


def test_fixed_send_accepts_only_the_endowment() -> None:
    params = Params(endowment=10, fixed_send=True)
    assert game.check_sent(10, params) == 10
    for amount in (0, 1, 9):
        assert _code(game.check_sent, amount, params) == "amount_out_of_range"


@pytest.mark.parametrize("value", [
    True, False, None, 2.5, float("nan"), float("inf"), -float("inf"), "abc", "", " ", "3.0", "1e2", "0x10", "+3",
    "--5", "- 5", "²", "١٢", "٣", "9" * 5000, [3], {"amount": 3}, b"3",
], ids=lambda v: repr(v)[:24])
def test_anything_but_a_whole_number_is_not_a_number(value: object) -> None:
    """Including strings that ``str.isdigit`` accepts but are not plain ASCII digits (they used to crash)."""
    assert _code(game.check_sent, value, DEFAULT) == "not_a_number"
    assert _code(game.check_returned, value, 30) == "not_a_number"
    assert _code(game.parse_points, value, name="x") == "not_a_number"


@given(st.text(max_size=30))
def test_parse_points_never_fails_with_anything_but_a_rule_error(text: str) -> None:
    try:
        value = game.parse_points(text, name="x")
    except RuleError as exc:
        assert exc.code == "not_a_number"
    else:
        assert value == int(text.strip())


@given(st.integers(0, 100), MULTIPLIERS, st.data())
def test_returns_from_zero_to_the_multiplied_amount(sent: int, multiplier: int, data) -> None:
    available = game.multiplied(sent, Params(multiplier=multiplier))
    amount = data.draw(st.integers(0, available))
    assert game.check_returned(amount, available) == amount
    assert _code(game.check_returned, available + data.draw(st.integers(1, 1000)), available) == "amount_out_of_range"
    assert _code(game.check_returned, -data.draw(st.integers(1, 1000)), available) == "amount_out_of_range"


# ---- messages ---------------------------------------------------------------------------------------

@given(st.integers(1, 300), st.data())
def test_messages_up_to_the_limit_are_kept_verbatim(limit: int, data) -> None:
    alphabet = st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"))
    text = data.draw(st.text(alphabet=alphabet, max_size=limit))
    assert game.check_message(text, Params(message_max_chars=limit)) == text


def test_message_limit_counts_characters_after_trimming() -> None:
    params = Params(message_max_chars=5)
    assert game.check_message("  hello \n", params) == "hello"
    assert game.check_message("héllo", params) == "héllo"
    assert _code(game.check_message, "hello!", params) == "message_too_long"
    assert game.check_message("a\r\nb", params) == "a\nb"


def test_markup_is_kept_as_plain_text() -> None:
    text = '<script>alert("x")</script>'
    assert game.check_message(text, DEFAULT) == text


@pytest.mark.parametrize("text", ["a\x00b", "\x00", "hi \x00", "\ud83d broken", "x\udfff", "\ude00\ud83d"])
def test_messages_no_database_can_store_are_refused(text: str) -> None:
    assert _code(game.check_message, text, DEFAULT) == "invalid_text"


def test_unstorable_text_is_found_anywhere_in_a_message() -> None:
    assert not game.unstorable_text({"type": "pitch.submit", "text": "hi \U0001f600 é", "n": [1, None, True]})
    for bad in ({"t": ["ok", {"k": "\udc00"}]}, {"\x00": 1}, ["a", "b\ud800"], "\x00"):
        assert game.unstorable_text(bad), bad
    deep: object = "\ud800"
    for _ in range(100_000):  # deeper than any recursion limit: the walk is iterative
        deep = [deep]
    assert game.unstorable_text(deep)


@pytest.mark.parametrize("text", [None, 5, ["hi"], {"text": "hi"}, True])
def test_messages_must_be_text(text: object) -> None:
    assert _code(game.check_message, text, DEFAULT) == "invalid_message"


def test_an_empty_message_is_allowed() -> None:
    assert game.check_message("   ", DEFAULT) == ""


@pytest.mark.parametrize(("value", "ok"), [(50, True), (100, True), (75, True), ("80", True), (49, False), (101, False),
                                           (0, False), (-50, False)])
def test_confidence_range(value: object, ok: bool) -> None:
    if ok:
        assert game.check_confidence(value) == int(value)
    else:
        assert _code(game.check_confidence, value) == "confidence_out_of_range"
    assert _code(game.check_confidence, None) == "not_a_number"


# ---- phases --------------------------------------------------------------------------------------

def _walk(params: Params) -> list[tuple[int, Phase]]:
    steps = [(1, Phase.PITCH)]
    while (following := game.next_phase(*steps[-1], params)) is not None:
        steps.append(following)
        assert len(steps) < 10_000
    return steps


def test_a_whole_game_with_belief_rounds() -> None:
    params = Params(n_rounds=3, belief_rounds=frozenset({1, 3}))
    round_phases = [Phase.PITCH, Phase.CHOICE, Phase.RETURN, Phase.FEEDBACK]
    expected = ([(1, p) for p in [*round_phases, Phase.BELIEF]] + [(2, p) for p in round_phases]
                + [(3, p) for p in [*round_phases, Phase.BELIEF]])
    assert _walk(params) == expected


@given(st.integers(1, 30), st.data())
def test_every_round_runs_its_phases_in_order(n_rounds: int, data) -> None:
    belief = frozenset(data.draw(st.sets(st.integers(1, n_rounds))))
    steps = _walk(Params(n_rounds=n_rounds, belief_rounds=belief))
    assert [r for r, _ in steps] == sorted(r for r, _ in steps)
    for r in range(1, n_rounds + 1):
        phases = [p for rr, p in steps if rr == r]
        assert phases == [Phase.PITCH, Phase.CHOICE, Phase.RETURN, Phase.FEEDBACK] + ([Phase.BELIEF] if r in belief else [])
    assert game.next_phase(*steps[-1], Params(n_rounds=n_rounds, belief_rounds=belief)) is None


def test_who_acts_in_each_phase() -> None:
    assert [game.actors(p) for p in Phase] == ["candidate", "selector", "candidate", None, "selector"]


@pytest.mark.parametrize(("spec", "expected"), [
    ("", set()), ("  ", set()), ("last", {10}), ("LAST", {10}), ("1,5", {1, 5}), (" 1 , 5 ,last", {1, 5, 10}),
    ("10", {10}), ("3,3", {3}),
])
def test_parse_belief_rounds(spec: str, expected: set[int]) -> None:
    assert game.parse_belief_rounds(spec, 10) == expected


@pytest.mark.parametrize("spec", ["0", "11", "-1", "first", "1;2", "1,,2", "1.5", "²", "last round"])
def test_parse_belief_rounds_refuses_what_it_cannot_read(spec: str) -> None:
    assert _code(game.parse_belief_rounds, spec, 10) == "belief_rounds"


# ---- seats -------------------------------------------------------------------------------------------

@st.composite
def compositions(draw):
    n_sel, n_cand = draw(st.integers(1, 6)), draw(st.integers(2, 8))
    n_bot_sel, n_bot_cand = draw(st.integers(0, n_sel)), draw(st.integers(0, n_cand))
    params = Params(n_selectors=n_sel, n_candidates=n_cand, n_bot_selectors=n_bot_sel, n_bot_candidates=n_bot_cand)
    if params.n_humans < 1:
        params = Params(n_selectors=n_sel, n_candidates=n_cand, n_bot_selectors=0, n_bot_candidates=n_bot_cand)
    return params


@given(compositions(), st.integers(0, 2**31))
def test_plan_seats_respects_the_composition(params: Params, seed: int) -> None:
    plans = game.plan_seats(params.n_humans, params, seed)
    selectors = [p for p in plans if p.role == "selector"]
    candidates = [p for p in plans if p.role == "candidate"]
    assert [p.seat for p in selectors] == [f"S{i + 1}" for i in range(params.n_selectors)]
    assert [p.seat for p in candidates] == [chr(ord("A") + i) for i in range(params.n_candidates)]
    assert sum(p.is_bot for p in selectors) == params.n_bot_selectors
    assert sum(p.is_bot for p in candidates) == params.n_bot_candidates
    for p in plans:  # bots never take a human, humans always have one
        assert (p.human_index is None) == p.is_bot
    assert sorted(p.human_index for p in plans if not p.is_bot) == list(range(params.n_humans))
    assert game.plan_seats(params.n_humans, params, seed) == plans  # reproducible from the seed


def test_plan_seats_assigns_roles_at_random() -> None:
    """Over many seeds, every arrival ends up in both roles and bots land on every candidate letter."""
    roles: dict[int, set[str]] = {i: set() for i in range(DEFAULT.n_humans)}
    bot_letters: Counter[str] = Counter()
    layouts = set()
    for seed in range(200):
        plans = game.plan_seats(DEFAULT.n_humans, DEFAULT, seed)
        layouts.add(tuple((p.seat, p.human_index) for p in plans))
        for p in plans:
            if p.human_index is not None:
                roles[p.human_index].add(p.role)
            elif p.role == "candidate":
                bot_letters[p.seat] += 1
    assert all(r == {"selector", "candidate"} for r in roles.values())
    assert set(bot_letters) == {"A", "B", "C", "D"}
    assert len(layouts) > 50


@pytest.mark.parametrize("arrived", [0, 4, 6])
def test_plan_seats_needs_exactly_the_humans_of_the_composition(arrived: int) -> None:
    assert _code(game.plan_seats, arrived, DEFAULT, 1) == "composition"


# ---- conditions -------------------------------------------------------------------------------------

@given(st.lists(st.sampled_from(["hidden", "disclosed", "late", "x"]), min_size=1, max_size=4, unique=True),
       st.integers(0, 2**31), st.integers(1, 60))
def test_pick_condition_keeps_the_arms_balanced(arms: list[str], seed: int, n_groups: int) -> None:
    counts = dict.fromkeys(arms, 0)
    for number in range(1, n_groups + 1):
        chosen = game.pick_condition(counts, seed, number)
        assert chosen in arms
        assert counts[chosen] == min(counts.values())
        counts[chosen] += 1
        assert max(counts.values()) - min(counts.values()) <= 1


def test_pick_condition_breaks_ties_at_random_but_reproducibly() -> None:
    firsts = {game.pick_condition({"hidden": 0, "disclosed": 0}, seed, 1) for seed in range(40)}
    assert firsts == {"hidden", "disclosed"}
    assert game.pick_condition({"a": 0, "b": 0}, 7, 3) == game.pick_condition({"a": 0, "b": 0}, 7, 3)
    assert game.pick_condition({"a": 2, "b": 1}, 7, 3) == "b"


def test_pick_condition_without_arms() -> None:
    assert _code(game.pick_condition, {}, 1, 1) == "no_conditions"


# ---- candidate order ----------------------------------------------------------------------------------

@given(st.integers(0, 2**31), st.sampled_from(["S1", "S2", "S3"]), st.integers(1, 50),
       st.lists(st.sampled_from(list("ABCDEFGH")), min_size=1, max_size=8, unique=True))
def test_candidate_order_is_a_reproducible_permutation(seed: int, seat: str, r: int, candidates: list[str]) -> None:
    order = game.candidate_order(seed, seat, r, candidates)
    assert sorted(order) == sorted(candidates)
    assert game.candidate_order(seed, seat, r, list(reversed(candidates))) == order  # input order is irrelevant


def test_candidate_order_varies_across_rounds_and_selectors() -> None:
    seats = list("ABCD")
    for seed in range(20):
        assert len({tuple(game.candidate_order(seed, "S1", r, seats)) for r in range(1, 11)}) > 1
        assert len({tuple(game.candidate_order(seed, s, 1, seats)) for s in ("S1", "S2", "S3", "S4", "S5")}) > 1
    # Every candidate is listed first about equally often (no position bias).
    firsts = Counter(game.candidate_order(seed, "S1", 1, seats)[0] for seed in range(2000))
    assert set(firsts) == set(seats) and min(firsts.values()) > 400


# ---- labels and defaults --------------------------------------------------------------------------------

@given(st.booleans(), st.integers(1, 20), st.integers(1, 20), st.booleans())
def test_identity_label(disclose: bool, from_round: int, r: int, is_bot: bool) -> None:
    label = game.identity_label(game.LabelPolicy(disclose=disclose, from_round=from_round), r, is_bot)
    if disclose and r >= from_round:
        assert label == ("AI bot" if is_bot else "Human")
    else:
        assert label == ""


def test_default_choice_is_a_reproducible_random_candidate() -> None:
    seats = ["D", "A", "C", "B"]
    picks = {game.default_choice(seed, "S1", 1, seats, DEFAULT) for seed in range(100)}
    assert picks == set(seats)
    assert game.default_choice(5, "S2", 3, seats, DEFAULT) == game.default_choice(5, "S2", 3, sorted(seats), DEFAULT)


def test_default_choice_none_when_configured_or_nobody_to_choose() -> None:
    assert game.default_choice(1, "S1", 1, ["A", "B"], Params(random_choice_on_timeout=False)) is None
    assert game.default_choice(1, "S1", 1, [], DEFAULT) is None


@pytest.mark.parametrize(("timeouts", "after", "dropped"), [(0, 2, False), (1, 2, False), (2, 2, True), (3, 2, True),
                                                            (0, 1, False), (1, 1, True)])
def test_is_dropped(timeouts: int, after: int, dropped: bool) -> None:
    assert game.is_dropped(timeouts, Params(dropout_after=after)) is dropped


def test_rng_depends_on_seed_and_purpose_only() -> None:
    assert game.rng(1, "a", 2).random() == game.rng(1, "a", 2).random()
    assert game.rng(1, "a", 2).random() != game.rng(1, "a", 3).random()
    assert game.rng(1, "a").random() != game.rng(2, "a").random()
    random.seed(0)  # the global generator has no influence
    first = game.candidate_order(9, "S1", 1, list("ABCD"))
    random.seed(1)
    assert game.candidate_order(9, "S1", 1, list("ABCD")) == first


def test_colour_of_is_stable_per_letter() -> None:
    assert game.colour_of("A") == game.PSEUDONYM_COLOURS[0]
    assert game.colour_of("I") == game.PSEUDONYM_COLOURS[0]
    assert game.colour_of("B") != game.colour_of("A")


# ---- design checks -------------------------------------------------------------------------------------

QUIZ_OK = [{"question": "q", "options": ["a", "b"], "answer": "a"}]
VALID = {"n_selectors": 3, "n_bot_selectors": 0, "n_candidates": 4, "n_bot_candidates": 2, "belief_rounds": "last",
         "n_rounds": 10, "quiz": QUIZ_OK}


def test_the_default_design_has_no_problem() -> None:
    assert game.design_problems(**VALID) == {}
    assert game.design_problems(**{**VALID, "quiz": []}) == {}


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"n_bot_candidates": 5}, "n_bot_candidates", "only 4 candidate seats"),
    ({"n_bot_selectors": 4}, "n_bot_selectors", "only 3 selector seats"),
    ({"n_candidates": 27, "n_bot_candidates": 0}, "n_candidates", "26"),
    ({"n_candidates": 1, "n_bot_candidates": 0}, "n_candidates", "at least 2"),
    ({"belief_rounds": "11"}, "belief_rounds", "outside rounds 1..10"),
    ({"belief_rounds": "sometimes"}, "belief_rounds", "sometimes"),
    ({"quiz": {"q": 1}}, "quiz", "list"),
    ({"quiz": [{"question": "q"}]}, "quiz", "Question 1"),
    ({"quiz": [*QUIZ_OK, {"question": "q", "options": ["a"], "answer": "z"}]}, "quiz", "question 2"),
])
def test_impossible_designs_are_named(change: dict, field: str, words: str) -> None:
    problems = game.design_problems(**{**VALID, **change})
    assert field in problems, problems
    assert words in problems[field]


@settings(max_examples=200)
@given(st.integers(1, 6), st.integers(0, 6), st.integers(1, 30), st.integers(0, 30))
def test_design_problems_agree_with_plan_seats(n_sel: int, n_bot_sel: int, n_cand: int, n_bot_cand: int) -> None:
    """Every design that passes the checks can seat a group."""
    problems = game.design_problems(n_selectors=n_sel, n_bot_selectors=n_bot_sel, n_candidates=n_cand,
                                    n_bot_candidates=n_bot_cand, belief_rounds="", n_rounds=1, quiz=[])
    if problems:
        return
    params = Params(n_selectors=n_sel, n_bot_selectors=n_bot_sel, n_candidates=n_cand, n_bot_candidates=n_bot_cand)
    plans = game.plan_seats(params.n_humans, params, 1)
    assert len(plans) == n_sel + n_cand
    assert all(p.seat.isalpha() and len(p.seat) == 1 for p in plans if p.role == "candidate")
