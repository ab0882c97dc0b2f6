"""The offline scripted bot backend: plays bot seats without any language model or network.

Its behaviour follows the bots of Jiang et al. (2025) in outline: prosocial (returns about half of
what it receives) and wordier than humans (messages of about 120 characters). Marked as
``controller = scripted`` in the data.
"""

from __future__ import annotations

import random
from typing import Any

from bots.policy import human_like_delay

_OPENERS = ["Hi!", "Hello there.", "Good to meet you.", "Hey, thanks for reading."]
_PROMISES = [
    "I will always return a fair share of what you send me,",
    "I give back at least half of what I receive, every single round,",
    "I split the multiplied amount so that you earn more than you sent,",
    "I return generously because I want a partnership that lasts,",
]
_CLOSERS = ["so we both end up better off. Choose me!", "so trusting me pays off for both of us. Deal?"]
# 32 distinct pitches of about 100-130 characters; see ScriptedBot.decide for how a seat picks one.
PITCHES = [f"{o} {p} {c}" for o in _OPENERS for p in _PROMISES for c in _CLOSERS]


class ScriptedBot:
    name = "scripted"

    def delay(self, phase: str, duration: float, rng: random.Random) -> float:
        lo, hi = {"pitch": (10, 25), "choice": (6, 15), "return": (4, 12), "belief": (6, 15)}.get(phase, (3, 8))
        return human_like_delay(lo, hi, duration, rng)

    def decide(self, state: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
        game = state["game"]
        phase, r = game["phase"], game["round"]
        if phase == "pitch":
            limit = state["experiment"]["message_max_chars"]
            # Seats A..Z differ by less than len(PITCHES), so two scripted bots never send the same pitch in a round.
            seat = (state["me"]["seat"] or "A")[0]
            text = PITCHES[(5 * r + ord(seat) - ord("A")) % len(PITCHES)]
            return [{"type": "pitch.submit", "round": r, "text": text[:limit]}]
        if phase == "return":
            return [{"type": "return.submit", "round": r, "selector": t["selector"],
                     "amount": round(t["multiplied"] * rng.uniform(0.45, 0.65))}
                    for t in game.get("to_return", []) if t["returned"] is None]
        if phase == "choice":
            best = max(game["candidates"], key=lambda c: (c["history"]["returned"] - c["history"]["sent"], rng.random()))
            endowment = state["experiment"]["endowment"]
            amount = endowment if state["experiment"]["fixed_send"] else rng.randint(endowment // 2, endowment)
            return [{"type": "choice.submit", "round": r, "candidate": best["seat"], "amount": amount}]
        if phase == "belief":
            return [{"type": "belief.submit", "round": r, "beliefs": {
                c["seat"]: {"guess": rng.choice(["human", "bot"]), "confidence": rng.randint(50, 80)}
                for c in game["candidates"]}}]
        return []
