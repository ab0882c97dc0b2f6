"""A participant in a real browser page, driven the way a person uses the page.

Controls are found by their role and accessible name (the label a person reads), never by layout.
Where the page is (stage, round, phase) is read from the ``data-*`` marks ``play.js`` keeps on ``#app``.
Every wait is a wait for a condition, bounded by the fixtures' generous default timeout.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from playwright.sync_api import Locator, Page, expect

if TYPE_CHECKING:
    from tests.e2e.conftest import Platform


def points(n: int) -> str:
    return f"{n} point" if n == 1 else f"{n} points"


class Shots:
    """Numbered full-page screenshots of one test under tests/e2e/artifacts/<test>/, in the order taken."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def take(self, page: Page, label: str) -> Path:
        self.count += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.count:02d}-{label}.png"
        # From the top: a full-page capture of a scrolled page paints the sticky game bar mid-page.
        scrolled = page.evaluate("() => { const y = window.scrollY; window.scrollTo(0, 0); return y; }")
        page.screenshot(path=path, full_page=True, animations="disabled", caret="hide")
        page.evaluate("y => window.scrollTo(0, y)", scrolled)
        return path


class Person:
    def __init__(self, *, name: str, page: Page, platform: Platform, shots: Shots) -> None:
        self.name, self.page, self.platform, self.shots = name, page, platform, shots
        self.token = ""
        self.page_errors: list[str] = []
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))

    # ---- where the page is --------------------------------------------------------------------------------

    def at(self, stage: str, round_number: int | None = None, phase: str | None = None, *, timeout: float | None = None) -> None:
        """Wait until the page shows this stage (and round and phase)."""
        marks = f'[data-stage="{stage}"]'
        if round_number is not None:
            marks += f'[data-round="{round_number}"]'
        if phase is not None:
            marks += f'[data-phase="{phase}"]'
        expect(self.page.locator(f"#app{marks}"), f"{self.name} should reach {stage} {round_number or ''} {phase or ''}"
               ).to_be_attached(**({"timeout": timeout} if timeout else {}))

    def mark(self, name: str) -> str:
        return self.page.locator("#app").get_attribute(f"data-{name}") or ""

    @property
    def seat(self) -> str:
        return self.mark("seat")

    @property
    def role(self) -> str:
        return self.mark("role")

    @property
    def public_name(self) -> str:
        return f"Candidate {self.seat}" if self.role == "candidate" else f"Selector {self.seat[1:]}"

    def heading(self, text: str | re.Pattern[str]) -> Locator:
        return self.page.get_by_role("heading", level=1, name=text, exact=isinstance(text, str))

    def snap(self, label: str) -> Path:
        return self.shots.take(self.page, f"{self.name}-{label}")

    def page_width(self) -> int:
        """How wide the document is: wider than the viewport means the page scrolls sideways."""
        return int(self.page.evaluate("document.scrollingElement.scrollWidth"))

    def ledger(self) -> dict[str, str]:
        """The rows of the page's ledger (label -> value), as shown on results and end pages."""
        rows = self.page.get_by_role("term")
        return {rows.nth(i).inner_text(): rows.nth(i).locator("xpath=following-sibling::dd[1]").inner_text()
                for i in range(rows.count())}

    # ---- before the game -------------------------------------------------------------------------------------

    def join(self, test: str) -> None:
        self.page.goto(self.platform.join_url(test))
        expect(self.page).to_have_url(re.compile(r"/play/[\w-]+/$"))
        self.token = self.page.url.rstrip("/").rsplit("/", 1)[1]
        self.at("consent")
        expect(self.heading("Consent to take part")).to_be_visible()

    def consent(self) -> None:
        self.page.get_by_role("button", name="I agree to take part").click()
        self.at("instructions")
        expect(self.heading("How the game works")).to_be_visible()

    def read_instructions(self) -> None:
        self.page.get_by_role("button", name="I have read the instructions").click()
        self.at("quiz")
        expect(self.heading("Check your understanding")).to_be_visible()

    def answer_quiz(self, answers: list[tuple[str, str]]) -> None:
        """``answers``: (question text, option text) pairs."""
        for question, option in answers:
            self.page.get_by_role("group", name=re.compile(re.escape(question))).get_by_role("radio", name=option, exact=True).check()

    def check_quiz(self, *, expect_wrong: int = 0) -> None:
        self.page.get_by_role("button", name="Check my answers").click()
        if expect_wrong:
            text = "One answer is not right yet." if expect_wrong == 1 else f"{expect_wrong} answers are not right yet."
            expect(self.page.get_by_role("alert").filter(has_text=text)).to_be_visible()
        else:
            self.at("lobby")
            expect(self.heading("Waiting for other participants")).to_be_visible()

    def onboard(self, quiz: list[dict[str, Any]]) -> None:
        """Consent, instructions and the quiz answered right: the person ends in the lobby."""
        self.consent()
        self.read_instructions()
        self.answer_quiz([(q["question"], q["answer"]) for q in quiz])
        self.check_quiz()

    # ---- selector ----------------------------------------------------------------------------------------------

    def pick(self, candidate: str, amount: int, *, endowment: int = 10, multiplier: int = 3) -> None:
        """Fill in the choice form (not sent yet)."""
        expect(self.heading("Choose a partner")).to_be_visible()
        self.page.get_by_role("radio", name=candidate, exact=True).check()
        self.page.get_by_role("spinbutton", name=f"How many of your {endowment} points do you send?").fill(str(amount))
        expect(self.page.get_by_text(f"You send {points(amount)} to {candidate}, who receives {points(amount * multiplier)}.")
               ).to_be_visible()

    def confirm_choice(self) -> None:
        self.page.get_by_role("button", name="Confirm my choice").click()

    def choice_shown(self, candidate: str, amount: int) -> Locator:
        return self.page.get_by_text(f"You chose {candidate} and sent {points(amount)}.")

    def give_beliefs(self, confidence: int) -> dict[str, tuple[str, int]]:
        """Guess "bot" for candidates labelled "AI bot" and "human" for the others; send. Returns seat -> guess."""
        expect(self.heading("Human or bot?")).to_be_visible()
        cards = self.page.get_by_role("group", name=re.compile(r"^Candidate [A-Z]$"))
        expect(cards.first).to_be_visible()
        given: dict[str, tuple[str, int]] = {}
        for i in range(cards.count()):
            card = cards.nth(i)
            name = card.get_by_role("radiogroup").get_attribute("aria-label").removeprefix("Is ").removesuffix(" a human or a bot?")
            guess = "bot" if card.get_by_text("AI bot", exact=True).count() else "human"
            card.get_by_role("radio", name="Bot" if guess == "bot" else "Human", exact=True).check()
            card.get_by_role("spinbutton", name=f"How sure are you about {name}?").fill(str(confidence))
            given[name.removeprefix("Candidate ")] = (guess, confidence)
        self.page.get_by_role("button", name="Submit my guesses").click()
        return given

    # ---- candidate -----------------------------------------------------------------------------------------------

    def write_pitch(self, text: str, *, limit: int = 200) -> None:
        expect(self.heading("Write your message")).to_be_visible()
        self.page.get_by_role("textbox", name="Your message to the selectors").fill(text)
        expect(self.page.get_by_text(f"{len(text)} / {limit}", exact=True)).to_be_visible()

    def send_pitch(self) -> None:
        self.page.get_by_role("button", name="Send message").click()

    def return_forms(self) -> list[str]:
        """Names of the selectors whose return is still open on the page, e.g. ["Selector 2"]."""
        forms = self.page.get_by_role("form", name=re.compile(r"^Selector \d+ chose you$"))
        return [forms.nth(i).get_by_role("heading").inner_text().removesuffix(" chose you") for i in range(forms.count())]

    def decide_return(self, selector: str, share: float) -> int:
        """Return ``share`` of what ``selector`` sent multiplied; returns the amount."""
        form = self.page.get_by_role("form", name=f"{selector} chose you")
        field = form.get_by_role("spinbutton", name=f"How many points do you return to {selector}?")
        available = int(field.get_attribute("max") or 0)
        amount = int(available * share)
        field.fill(str(amount))
        expect(form.get_by_text(f"{selector} gets {points(amount)} back; you keep {points(available - amount)}.")).to_be_visible()
        form.get_by_role("button", name=f"Return {points(amount)}").click()
        return amount

    # ---- after the game -----------------------------------------------------------------------------------------------

    def fill_questionnaire(self, *, age: int, gender: str, attitude: int, suspected: str, comments: str) -> None:
        self.at("questionnaire")
        expect(self.heading("A few last questions")).to_be_visible()
        self.page.get_by_role("spinbutton", name="How old are you?").fill(str(age))
        self.page.get_by_role("group", name="Your gender").get_by_role("radio", name=gender, exact=True).check()
        scale = self.page.get_by_role("group", name=re.compile(r"artificial intelligence"))
        scale.get_by_role("radio", name=str(attitude), exact=True).check()
        self.page.get_by_role("group", name="Did you think some candidates were bots?").get_by_role("radio", name=suspected,
                                                                                                   exact=True).check()
        self.page.get_by_role("textbox", name=re.compile(r"^Anything else")).fill(comments)

    def finish(self) -> None:
        self.page.get_by_role("button", name="Submit and finish").click()
        self.at("finished")
        expect(self.heading("Thank you!")).to_be_visible()
