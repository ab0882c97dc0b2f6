"""The offline scripted backend: distinct, human-length pitches and answers within the rules."""

from __future__ import annotations

import random

from bots.scripted import PITCHES, ScriptedBot


def _state(seat: str, r: int, phase: str = "pitch", **game) -> dict:
    return {"me": {"seat": seat}, "experiment": {"message_max_chars": 200, "endowment": 10, "fixed_send": False},
            "game": {"round": r, "phase": phase, **game}}


def test_two_bots_in_a_group_never_send_the_same_pitch() -> None:
    bot = ScriptedBot()
    for r in range(1, 31):
        texts = [bot.decide(_state(seat, r), random.Random(r))[0]["text"] for seat in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
        assert len(set(texts)) == 26, r


def test_pitches_are_about_as_long_as_the_bots_in_the_paper() -> None:
    lengths = [len(p) for p in PITCHES]
    assert len(set(PITCHES)) == 32 and 90 <= sum(lengths) / len(lengths) <= 150 and max(lengths) <= 200


def test_returns_stay_within_what_was_received() -> None:
    bot = ScriptedBot()
    to_return = [{"selector": "S1", "multiplied": 30, "returned": None}, {"selector": "S2", "multiplied": 0, "returned": None}]
    for seed in range(50):
        for action in bot.decide(_state("A", 1, "return", to_return=to_return), random.Random(seed)):
            assert 0 <= action["amount"] <= {"S1": 30, "S2": 0}[action["selector"]]
