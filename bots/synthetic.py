"""How a synthetic human decides. The one copy of this behaviour: the demo filler, ``simulate``,
``power`` and the load benchmark all use it; only the transport around it differs.

Decisions read the seat's state (what a browser in the seat shows) and return protocol messages.

Selectors learn from returns: each candidate's value starts at ``prior_ratio`` (minus ``bot_bias``
when the candidate is labelled "AI bot") and moves towards the return ratio observed with that
candidate, by ``learning_rate`` per round chosen; the choice is a softmax over values with
``temperature``. Candidates return a ratio drawn around ``return_mean``, write messages of a length
drawn around ``message_length``, and every decision is skipped with ``dropout`` probability.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from bots.policy import human_like_delay

WORDS = ["hi", "trust", "me", "i", "will", "return", "half", "fair", "share", "send", "points", "we", "both", "win", "deal", "promise", "choose", "cooperate", "honest", "together", "good", "partner", "lets", "earn", "more", "every", "round"]


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


class SyntheticHuman:
    name = "synthetic"

    def __init__(self, params: SyntheticParams | None = None) -> None:
        self.params = params or SyntheticParams()

    def delay(self, phase: str, duration: float, rng: random.Random) -> float:
        lo, hi = {"pitch": (8, 30), "choice": (5, 25), "return": (4, 20), "belief": (8, 25)}.get(phase, (3, 8))
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

    def decide(self, state: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
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
