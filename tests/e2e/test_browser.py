"""Browser end-to-end tests: people play PartnerLab in Chromium against a real server.

Each test plays its own session (tests/e2e/setup_game.py) with synthetic participants and scripted
bots in the seats nobody took. The people are scripted so that every phase waits for one of them:
a screenshot of the other one's waiting page is therefore taken while that page is really waiting.
Screenshots of every stage and phase go to tests/e2e/artifacts/<test>/ (git-ignored), to be looked at.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from playwright.sync_api import Locator, expect

from tests.e2e.conftest import Platform
from tests.e2e.participant import Person, points
from tests.e2e.setup_game import COMPLETION_CODE

pytestmark = pytest.mark.e2e

# en-GB: the money on the end page is formatted by the browser's locale.
PHONE = {"viewport": {"width": 375, "height": 667}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True, "locale": "en-GB"}
DESKTOP = {"viewport": {"width": 1280, "height": 900}, "locale": "en-GB"}
ANSWERS = {"age": 34, "gender": "prefer not to say", "attitude": 5, "suspected": "yes"}

View = Callable[[Person, str], None]
People = Callable[..., Person]


def screenshot_only(person: Person, label: str) -> None:
    person.snap(label)


@dataclass
class Played:
    """What the two people did, to compare with the stored data."""

    pitches: dict[int, str] = field(default_factory=dict)
    choices: dict[int, tuple[str, int]] = field(default_factory=dict)  # round -> (candidate seat, sent)
    returns: dict[int, dict[str, tuple[int, int]]] = field(default_factory=dict)  # round -> selector seat -> (returned, available)
    beliefs: dict[str, tuple[str, int]] = field(default_factory=dict)


def seat_of(public_name: str) -> str:
    """ "Selector 2" -> "S2", "Candidate B" -> "B"."""
    kind, _, number = public_name.partition(" ")
    return f"S{number}" if kind == "Selector" else number


def left_phase(person: Person, phase: str) -> Locator:
    return person.page.locator(f'#app:not([data-phase="{phase}"])')


def into_the_game(first: Person, second: Person, test: str, platform: Platform, view: View) -> None:
    """Both people join, onboard (the second answers the quiz wrong once) and reach the lobby in order."""
    session = platform.sessions[test]
    quiz = session["quiz"]
    for person in (first, second):
        person.join(test)
    view(first, "consent")
    for person in (first, second):
        person.consent()
    view(first, "instructions")
    for person in (first, second):
        person.read_instructions()
    view(first, "quiz")
    # A wrong answer first: the page says which question to look at again, and nothing moves on.
    wrong = next(o for o in quiz[0]["options"] if o != quiz[0]["answer"])
    second.answer_quiz([(quiz[0]["question"], wrong)] + [(q["question"], q["answer"]) for q in quiz[1:]])
    second.check_quiz(expect_wrong=1)
    expect(second.page.get_by_text("Not right yet – please look at this one again.")).to_be_visible()
    view(second, "quiz-wrong-answer")
    second.answer_quiz([(quiz[0]["question"], quiz[0]["answer"])])
    first.answer_quiz([(q["question"], q["answer"]) for q in quiz])
    # The lobby order decides the roles (the session's seed was chosen for it): first, then second,
    # both within the synthetic-fill window.
    first.check_quiz()
    second.check_quiz()
    expect(first.page.get_by_text("We need 3 more participants to start (2 of 5 are here).")).to_be_visible()
    view(first, "lobby")
    for person in (first, second):
        person.at("playing", 1, "pitch")


def play_round(sel: Person, cand: Person, r: int, rounds: int, played: Played, view: View) -> None:
    """One round in which the selector person chooses the candidate person.

    Every phase waits for one of the two: the pitch for the candidate's message, the choice for the
    selector's choice, the return for the candidate's return to the selector."""
    amount = 6 if r == 1 else 4
    share = 0.5 if r == 1 else 1 / 3
    name = cand.public_name

    # ---- pitch
    sel.at("playing", r, "pitch")
    cand.at("playing", r, "pitch")
    expect(sel.page.get_by_text("Candidates are writing their messages.")).to_be_visible()
    view(sel, f"r{r}-pitch-waiting")
    text = f"Round {r}: pick me and I return half of what I get. Fair for both of us!"
    cand.write_pitch(text)
    view(cand, f"r{r}-pitch-writing")
    cand.send_pitch()
    expect(cand.heading("Your message").or_(left_phase(cand, "pitch"))).to_be_attached()
    if cand.mark("phase") == "pitch":
        view(cand, f"r{r}-pitch-sent")
    played.pitches[r] = text

    # ---- choice: the candidate reads every message, the selector chooses
    cand.at("playing", r, "choice")
    expect(cand.heading("Selectors are choosing")).to_be_visible()
    expect(cand.page.get_by_text(text)).to_be_visible()
    view(cand, f"r{r}-choice-waiting")
    sel.at("playing", r, "choice")
    expect(sel.page.get_by_text(text)).to_be_visible()
    if r > 1:
        before = played.choices[r - 1][1]
        got = played.returns[r - 1][sel.seat][0]
        expect(sel.page.get_by_text(f"You chose them in round {r - 1}: sent {points(before)}, got back {points(got)}.")).to_be_visible()
    view(sel, f"r{r}-choice-form")
    sel.pick(name, amount)
    view(sel, f"r{r}-choice-filled")
    sel.confirm_choice()
    played.choices[r] = (cand.seat, amount)
    expect(sel.choice_shown(name, amount).or_(left_phase(sel, "choice"))).to_be_attached()
    if sel.mark("phase") == "choice":
        view(sel, f"r{r}-choice-sent")

    # ---- return: the selector waits for the candidate person, who may also answer synthetic selectors
    sel.at("playing", r, "return")
    expect(sel.heading("Waiting for the return")).to_be_visible()
    expect(sel.page.get_by_text(f"You sent {points(amount)} to {name}, who received {points(3 * amount)}.")).to_be_visible()
    view(sel, f"r{r}-return-waiting")
    cand.at("playing", r, "return")
    open_forms = cand.return_forms()
    assert sel.public_name in open_forms, open_forms
    view(cand, f"r{r}-return-form")
    played.returns[r] = {}
    for selector in open_forms:
        available = int(cand.page.get_by_role("form", name=f"{selector} chose you").get_by_role("spinbutton").get_attribute("max"))
        played.returns[r][seat_of(selector)] = (cand.decide_return(selector, share), available)
    returned = played.returns[r][sel.seat][0]
    expect(cand.heading("Your returns").or_(left_phase(cand, "return"))).to_be_attached()
    if cand.mark("phase") == "return":
        view(cand, f"r{r}-return-sent")

    # ---- results (fixed length): both pages show the round's ledger
    for person in (sel, cand):
        person.at("playing", r, "feedback")
        expect(person.heading(f"Round {r} results")).to_be_visible()
    sel_ledger = sel.ledger()
    assert sel_ledger[f"{name} returned"] == f"+ {returned}", sel_ledger
    assert sel_ledger["Your payoff this round"] == points(10 - amount + returned), sel_ledger
    cand_ledger = cand.ledger()
    earned = sum(available - back for back, available in played.returns[r].values())
    assert cand_ledger["Your earnings this round"] == points(earned), cand_ledger
    view(sel, f"r{r}-results")
    view(cand, f"r{r}-results")


def finish_both(sel: Person, cand: Person, view: View) -> dict[str, dict[str, str]]:
    ends = {}
    for person, comments in ((sel, "Clear and quick."), (cand, "")):
        person.fill_questionnaire(age=ANSWERS["age"], gender=ANSWERS["gender"], attitude=ANSWERS["attitude"],
                                  suspected=ANSWERS["suspected"], comments=comments)
        view(person, "questionnaire")
        person.finish()
        expect(person.page.get_by_text(COMPLETION_CODE, exact=True)).to_be_visible()
        view(person, "end")
        ends[person.name] = person.ledger()
    return ends


# ---- stored data ------------------------------------------------------------------------------------------

def seat_row(platform: Platform, person: Person) -> Any:
    rows = platform.rows("SELECT id, group_id, seat, role, controller, status, payoff FROM experiment_participant WHERE token = ?",
                         person.token)
    assert len(rows) == 1, f"{person.name}: no seat stored for the token in the page's URL"
    return rows[0]


def stored_choices(platform: Platform, selector_id: int) -> dict[int, tuple[str, int, int, int]]:
    rows = platform.rows("SELECT c.round_number, p.seat, c.sent, c.multiplied, c.timed_out FROM experiment_choice c "
                         "JOIN experiment_participant p ON p.id = c.candidate_id WHERE c.selector_id = ?", selector_id)
    return {r["round_number"]: (r["seat"], r["sent"], r["multiplied"], r["timed_out"]) for r in rows}


def stored_returns(platform: Platform, candidate_id: int) -> dict[int, dict[str, tuple[int, int, int]]]:
    rows = platform.rows("SELECT c.round_number, s.seat, r.returned, r.available, r.timed_out FROM experiment_return r "
                         "JOIN experiment_choice c ON c.id = r.choice_id JOIN experiment_participant s ON s.id = c.selector_id "
                         "WHERE r.candidate_id = ?", candidate_id)
    out: dict[int, dict[str, tuple[int, int, int]]] = {}
    for row in rows:
        out.setdefault(row["round_number"], {})[row["seat"]] = (row["returned"], row["available"], row["timed_out"])
    return out


def stored_answers(platform: Platform, participant_id: int) -> dict[str, Any]:
    rows = platform.rows("SELECT answers FROM experiment_questionnaireresponse WHERE participant_id = ?", participant_id)
    assert len(rows) == 1
    return json.loads(rows[0]["answers"])


def assert_pair_stored(platform: Platform, sel: Person, cand: Person, played: Played, rounds: int,
                       ends: dict[str, dict[str, str]]) -> None:
    s, c = seat_row(platform, sel), seat_row(platform, cand)
    assert s["group_id"] == c["group_id"], "the two people should have played in one group"
    assert (s["role"], s["seat"], s["controller"], s["status"]) == ("selector", sel.seat, "person", "finished")
    assert (c["role"], c["seat"], c["controller"], c["status"]) == ("candidate", cand.seat, "person", "finished")
    others = platform.rows("SELECT kind, controller FROM experiment_participant WHERE group_id = ? AND id NOT IN (?, ?)",
                           s["group_id"], s["id"], c["id"])
    assert sorted((o["kind"], o["controller"]) for o in others) == [("bot", "scripted")] * 2 + [("human", "synthetic")] * 3

    messages = platform.rows("SELECT round_number, text, timed_out FROM experiment_message WHERE candidate_id = ?", c["id"])
    assert {m["round_number"]: (m["text"], m["timed_out"]) for m in messages} == {r: (t, 0) for r, t in played.pitches.items()}
    assert len(played.pitches) == rounds

    assert stored_choices(platform, s["id"]) == {r: (seat, sent, 3 * sent, 0) for r, (seat, sent) in played.choices.items()}
    assert stored_returns(platform, c["id"]) == {
        r: {seat: (back, available, 0) for seat, (back, available) in per.items()} for r, per in played.returns.items()}

    for person, row in ((sel, s), (cand, c)):
        # The design pays 0.01 GBP per point and a 2.00 GBP fee.
        assert ends[person.name] == {"Points earned": points(row["payoff"]), "Your bonus": f"£{row['payoff'] / 100:.2f}",
                                     "Participation fee (paid separately)": "£2.00"}, (person.name, ends[person.name])
    expected_sel = sum(10 - sent + played.returns[r][sel.seat][0] for r, (_, sent) in played.choices.items())
    assert s["payoff"] == expected_sel
    assert c["payoff"] == sum(available - back for per in played.returns.values() for back, available in per.values())

    assert stored_answers(platform, s["id"]) == {"age": 34, "gender": "prefer not to say", "ai_attitude": 5, "suspected_bots": "yes",
                                                 "comments": "Clear and quick."}
    assert stored_answers(platform, c["id"])["comments"] == ""


# ---- the tests ------------------------------------------------------------------------------------------------

def test_two_people_play_a_whole_game_with_synthetic_participants(platform: Platform, people: People) -> None:
    sel = people("selector", **DESKTOP)
    cand = people("candidate", **DESKTOP)
    into_the_game(sel, cand, "full_game", platform, screenshot_only)
    assert (sel.role, cand.role) == ("selector", "candidate"), "the session's seed should seat the first person as a selector"
    rounds = platform.sessions["full_game"]["rounds"]
    played = Played()
    for r in range(1, rounds + 1):
        play_round(sel, cand, r, rounds, played, screenshot_only)

    # The last round has a belief phase: only selectors guess.
    cand.at("playing", rounds, "belief")
    expect(cand.page.get_by_text("Selectors are giving their guesses about the candidates.")).to_be_visible()
    cand.snap("belief-waiting")
    sel.at("playing", rounds, "belief")
    sel.snap("belief-form")
    played.beliefs = sel.give_beliefs(confidence=70)
    expect(sel.heading("Your guesses").or_(sel.page.locator('#app:not([data-stage="playing"])'))).to_be_attached()
    if sel.mark("stage") == "playing":
        sel.snap("belief-sent")

    ends = finish_both(sel, cand, screenshot_only)
    assert_pair_stored(platform, sel, cand, played, rounds, ends)
    s = seat_row(platform, sel)
    beliefs = platform.rows("SELECT b.round_number, p.seat, b.guess, b.confidence, b.timed_out FROM experiment_belief b "
                            "JOIN experiment_participant p ON p.id = b.candidate_id WHERE b.selector_id = ?", s["id"])
    assert {b["seat"]: (b["guess"], b["confidence"]) for b in beliefs} == played.beliefs
    assert {(b["round_number"], b["timed_out"]) for b in beliefs} == {(rounds, 0)}
    # Disclosed condition: the guesses followed the labels, so they name the bots exactly.
    bots = {row["seat"] for row in platform.rows("SELECT seat FROM experiment_participant WHERE group_id = ? AND kind = 'bot'",
                                                 s["group_id"])}
    assert {seat for seat, (guess, _) in played.beliefs.items() if guess == "bot"} == bots
    # The session played in the browser replays from its log as stored (--check exits 1 on any difference).
    report = json.loads(platform.manage("replay", str(platform.sessions["full_game"]["session_id"]), "--check", "--json"))
    assert report["identical"] and report["differences"] == [] and report["inputs"] > 20


def test_reload_in_the_middle_of_a_phase_keeps_the_round_the_draft_and_the_choice(platform: Platform, people: People) -> None:
    sel = people("selector", **DESKTOP)
    other = people("other-selector", **DESKTOP)
    into_the_game(sel, other, "reload", platform, screenshot_only)
    assert (sel.role, other.role) == ("selector", "selector")
    sel.at("playing", 1, "choice")
    other.at("playing", 1, "choice")
    first = sel.page.get_by_role("radio").first
    name = f"Candidate {first.get_attribute('value')}"

    # A draft: candidate and amount picked, not sent. A reload keeps the page in this phase and the draft.
    sel.pick(name, 3)
    sel.snap("draft-before-reload")
    sel.page.reload()
    sel.at("playing", 1, "choice")
    expect(sel.heading("Choose a partner")).to_be_visible()
    expect(sel.page.get_by_role("radio", name=name, exact=True)).to_be_checked()
    expect(sel.page.get_by_role("spinbutton", name="How many of your 10 points do you send?")).to_have_value("3")
    expect(sel.page.get_by_text(f"You send 3 points to {name}, who receives 9 points.")).to_be_visible()
    sel.snap("draft-after-reload")
    s = seat_row(platform, sel)
    assert stored_choices(platform, s["id"]) == {}, "a reload must not send a draft"

    # Sent: after a reload the page is still in the choice phase (the other selector has not chosen)
    # and shows the choice as made.
    sel.confirm_choice()
    expect(sel.choice_shown(name, 3)).to_be_visible()
    sel.page.reload()
    sel.at("playing", 1, "choice")
    expect(sel.heading("Your choice")).to_be_visible()
    expect(sel.choice_shown(name, 3)).to_be_visible()
    expect(sel.page.get_by_text("Waiting for the other selectors.")).to_be_visible()
    sel.snap("sent-after-reload")

    # The other selector chooses, the phase moves on; a reload then shows the choice in the return phase.
    other.pick(name, 5)
    other.confirm_choice()
    sel.at("playing", 1, "return")
    sel.page.reload()
    sel.at("playing", 1, "return")
    expect(sel.page.get_by_text(f"You sent 3 points to {name}, who received 9 points.")).to_be_visible()
    sel.snap("return-after-reload")
    assert stored_choices(platform, s["id"]) == {1: (seat_of(name), 3, 9, 0)}


def test_phone_sized_screen_plays_a_whole_round_without_sideways_scrolling(platform: Platform, people: People) -> None:
    sel = people("phone-selector", **PHONE)
    cand = people("phone-candidate", **PHONE)
    widths: list[tuple[str, str, int]] = []

    def view(person: Person, label: str) -> None:
        widths.append((person.name, label, person.page_width()))
        person.snap(label)

    into_the_game(sel, cand, "phone", platform, view)
    assert (sel.role, cand.role) == ("selector", "candidate")
    played = Played()
    play_round(sel, cand, 1, 1, played, view)
    ends = finish_both(sel, cand, view)
    assert_pair_stored(platform, sel, cand, played, 1, ends)
    too_wide = [w for w in widths if w[2] > 375]
    assert not too_wide, f"pages wider than the 375 px screen (they scroll sideways): {too_wide}"
    assert any(label == "r1-choice-filled" for _, label, _ in widths)


def test_keyboard_only_choice(platform: Platform, people: People) -> None:
    person = people("keyboard", **DESKTOP)
    person.join("keyboard")
    person.onboard(platform.sessions["keyboard"]["quiz"])
    person.at("playing", 1, "choice")
    assert person.role == "selector"
    page = person.page
    expect(person.heading("Choose a partner")).to_be_visible()
    expect(person.heading("Choose a partner")).to_be_focused()  # a new step puts the focus at its top

    def focused() -> dict[str, str]:
        return page.evaluate("() => { const e = document.activeElement;"
                             " return {tag: e.tagName, type: e.type || '', value: e.value || '', text: e.textContent || ''}; }")

    def tab_to(kind: str, limit: int = 12) -> dict[str, str]:
        for _ in range(limit):
            page.keyboard.press("Tab")
            now = focused()
            if now["type"] == kind:
                return now
        raise AssertionError(f"Tab never reached a {kind} control; focus is on {focused()}")

    first = tab_to("radio")
    page.keyboard.press("Space")
    expect(page.get_by_role("radio", checked=True)).to_have_attribute("value", first["value"])
    person.snap("keyboard-first-candidate-focused")
    page.keyboard.press("ArrowDown")  # moves to the next candidate in the shown order and chooses it
    chosen = focused()["value"]
    assert chosen != first["value"]
    expect(page.get_by_role("radio", checked=True)).to_have_attribute("value", chosen)

    tab_to("range")
    for _ in range(4):
        page.keyboard.press("ArrowRight")
    amount = page.get_by_role("spinbutton", name="How many of your 10 points do you send?")
    expect(amount).to_have_value("4")
    expect(page.get_by_text(f"You send 4 points to Candidate {chosen}, who receives 12 points.")).to_be_visible()
    button = tab_to("submit")
    assert button["text"] == "Confirm my choice", button
    person.snap("keyboard-on-confirm")
    page.keyboard.press("Enter")
    expect(person.choice_shown(f"Candidate {chosen}", 4).or_(left_phase(person, "choice"))).to_be_attached()
    person.snap("keyboard-sent")
    assert stored_choices(platform, seat_row(platform, person)["id"]) == {1: (chosen, 4, 12, 0)}

