"""What every automated seat implements: when to act and what to send.

A policy reads the seat's state (exactly what a browser in the seat receives, see
``experiment.selectors.seat_state``) and answers with protocol messages (``docs/protocol.md``), which
go through the same validation and services as a human's.
"""

from __future__ import annotations

import random
from typing import Any, Protocol


class Policy(Protocol):
    def delay(self, phase: str, duration: float, rng: random.Random) -> float:
        """Seconds to wait after the phase opens before acting (human-like, never instant)."""

    def decide(self, state: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
        """The protocol messages to send now (empty: do nothing and let the deadline default apply)."""


def human_like_delay(lo: float, hi: float, duration: float, rng: random.Random) -> float:
    """A delay in [lo, hi] seconds, squeezed into the first 60 % of the phase so it never misses the deadline."""
    ceiling = 0.6 * duration
    value = rng.uniform(lo, hi)
    if value > ceiling:
        value = rng.uniform(0.25 * duration, ceiling)
    return max(0.2, value)
