"""How a synthetic human decides. The one copy of this behaviour: the demo filler, ``simulate``,
``power`` and the load benchmark all use it; only the transport around it differs.

Decisions read the seat's state (what a browser in the seat shows) and return protocol messages.

Selectors learn from returns: each candidate's value starts at ``prior_ratio`` (minus ``bot_bias``
when the candidate is labelled "AI bot") and moves towards the return ratio observed with that
candidate, by ``learning_rate`` per round chosen; the choice is a softmax over values with
``temperature``. Candidates return a ratio drawn around ``return_mean``, write messages of a length
drawn around ``message_length``, and every decision is skipped with ``dropout`` probability.

Outside the game (consent, instructions, quiz, questionnaire) a synthetic human always consents,
answers the quiz from the answer key it is given (each answer wrong with ``quiz_error``
probability, so retries happen) and fills in the questionnaire.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bots.policy import human_like_delay

WORDS = ["hi", "trust", "me", "i", "will", "return", "half", "fair", "share", "send", "points", "we", "both", "win", "deal",
         "promise", "choose", "cooperate", "honest", "together", "good", "partner", "lets", "earn", "more", "every", "round"]


@dataclass(frozen=True)
class SyntheticParams:
    prior_ratio: float = 0.3
    bot_bias: float = 0.1
    learning_rate: float = 0.5
    temperature: float = 0.1
    send_mean: float = 0.6
    return_mean: float = 0.35
    return_sd: float = 0.2
    message_length: int = 48
    dropout: float = 0.0
    speed: float = 1.0  # multiplies response times (a smaller value answers faster)
    quiz_error: float = 0.0

    def __post_init__(self) -> None:
        for name in ("dropout", "learning_rate", "quiz_error"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {getattr(self, name)}.")
        for name in ("temperature", "speed"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be greater than 0, not {getattr(self, name)}.")
        if self.message_length < 1:
            raise ValueError(f"message_length must be at least 1, not {self.message_length}.")
        if self.return_sd < 0:
            raise ValueError(f"return_sd cannot be negative, not {self.return_sd}.")

    @classmethod
    def from_options(cls, options: Iterable[str], *, base: SyntheticParams | None = None) -> SyntheticParams:
        """Parameters from ``name=value`` strings (command-line options); ValueError names what is wrong."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for option in options:
            name, sep, raw = option.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in fields:
                raise ValueError(f"Behaviour options look like name=value with a name among {', '.join(fields)}; "
                                 f"got {option!r}.")
            kind = int if fields[name].type in ("int", int) else float
            try:
                changes[name] = kind(raw.strip())
            except ValueError:
                raise ValueError(f"{name} needs {'a whole number' if kind is int else 'a number'}, not {raw!r}.") from None
        return dataclasses.replace(base or cls(), **changes)


# Seconds a person takes, before any ``speed`` scaling: game phases, then the stages around the game.
TIMES = {"pitch": (8, 30), "choice": (5, 25), "return": (4, 20), "belief": (8, 25),
         "consent": (5, 20), "instructions": (15, 60), "quiz": (10, 40), "questionnaire": (20, 60)}


class SyntheticHuman:
    name = "synthetic"

    def __init__(self, params: SyntheticParams | None = None, *, quiz_key: Mapping[str, str] | None = None) -> None:
        """``quiz_key``: question id → correct answer (what a person learns from the instructions)."""
        self.params = params or SyntheticParams()
        self.quiz_key = dict(quiz_key or {})

    def delay(self, phase: str, duration: float, rng: random.Random) -> float:
        """Seconds after a phase (or a stage outside the game) opens before acting."""
        lo, hi = TIMES.get(phase, (3, 8))
        return human_like_delay(lo * self.params.speed, hi * self.params.speed, duration, rng)

    def value(self, candidate: dict[str, Any], multiplier: int) -> float:
        p = self.params
        value = p.prior_ratio - (p.bot_bias if candidate.get("label") == "AI bot" else 0.0)
        history = candidate["history"]
        if history["rounds"] and history["sent"] > 0:
            observed = history["returned"] / (history["sent"] * multiplier)
            weight = 1 - (1 - p.learning_rate) ** len(history["rounds"])
            value += weight * (observed - value)
        return value

    def choose(self, candidates: list[dict[str, Any]], multiplier: int, rng: random.Random) -> dict[str, Any]:
        values = [self.value(c, multiplier) / max(self.params.temperature, 1e-6) for c in candidates]
        top = max(values)
        weights = [math.exp(v - top) for v in values]
        return rng.choices(candidates, weights=weights)[0]

    def message(self, limit: int, rng: random.Random) -> str:
        target = max(1, min(limit, int(rng.gauss(self.params.message_length, self.params.message_length / 3))))
        words: list[str] = []
        while len(" ".join(words)) < target:
            words.append(rng.choice(WORDS))
        return " ".join(words)[:target].strip() or "hi"

    def answer_quiz(self, questions: list[dict[str, Any]], rng: random.Random) -> dict[str, str]:
        answers = {}
        for q in questions:
            right = self.quiz_key.get(q["id"])
            wrong = [o for o in q["options"] if o != right]
            if right is None or (wrong and rng.random() < self.params.quiz_error):
                answers[q["id"]] = rng.choice(wrong or q["options"])
            else:
                answers[q["id"]] = right
        return answers

    def answer_questionnaire(self, questions: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]:
        answers: dict[str, Any] = {}
        for q in questions:
            if q["kind"] == "number":
                answers[q["id"]] = rng.randint(q["min"], min(q["max"], q["min"] + 50))
            elif q["kind"] == "scale":
                answers[q["id"]] = rng.randint(q["min"], q["max"])
            elif q["kind"] == "choice":
                answers[q["id"]] = rng.choice(q["options"])
            else:
                answers[q["id"]] = "" if q.get("optional") else "ok"
        return answers

    def _outside_game(self, state: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
        stage = state.get("stage")
        if stage == "consent":
            return [{"type": "consent", "accept": True}]
        if stage == "instructions":
            return [{"type": "instructions.done"}]
        if stage == "quiz":
            return [{"type": "quiz.submit", "answers": self.answer_quiz(state["quiz"]["questions"], rng)}]
        if stage == "questionnaire":
            return [{"type": "questionnaire.submit", "answers": self.answer_questionnaire(state["questionnaire"]["questions"], rng)}]
        return []

    def decide(self, state: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
        if "game" not in state:
            return self._outside_game(state, rng)
        game, experiment = state["game"], state["experiment"]
        if not game.get("todo") or rng.random() < self.params.dropout:
            return []
        phase, r = game["phase"], game["round"]
        if phase == "pitch":
            return [{"type": "pitch.submit", "round": r, "text": self.message(experiment["message_max_chars"], rng)}]
        if phase == "choice":
            endowment = experiment["endowment"]
            chosen = self.choose(game["candidates"], experiment["multiplier"], rng)
            amount = endowment if experiment["fixed_send"] else min(endowment, max(0, round(
                rng.gauss(self.params.send_mean, 0.25) * endowment)))
            return [{"type": "choice.submit", "round": r, "candidate": chosen["seat"], "amount": amount}]
        if phase == "return":
            return [{"type": "return.submit", "round": r, "selector": t["selector"],
                     "amount": min(t["multiplied"], max(0, round(
                         rng.gauss(self.params.return_mean, self.params.return_sd) * t["multiplied"])))}
                    for t in game.get("to_return", []) if t["returned"] is None]
        if phase == "belief":
            return [{"type": "belief.submit", "round": r, "beliefs": {
                c["seat"]: {"guess": "bot" if len(c.get("message") or "") > 80 else "human",
                            "confidence": rng.randint(50, 90)} for c in game["candidates"]}}]
        return []
