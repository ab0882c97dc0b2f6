"""A test participant over a real websocket connection (channels' WebsocketCommunicator)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from channels.testing import WebsocketCommunicator

from config.asgi import application
from experiment.events import apply_event


class Seat:
    def __init__(self, token: str, *, origin: str = "http://127.0.0.1") -> None:
        self.comm = WebsocketCommunicator(application, f"/ws/play/{token}/",
                                          headers=[(b"origin", origin.encode()), (b"host", b"127.0.0.1")])
        self.state: dict[str, Any] = {}
        self.log: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []

    async def connect(self) -> Seat:
        connected, _ = await self.comm.connect()
        assert connected
        await self.until(lambda s: True)
        return self

    async def close(self) -> None:
        await self.comm.disconnect()

    async def _pump(self, timeout: float) -> dict[str, Any]:
        raw = await self.comm.receive_from(timeout=timeout)
        event = json.loads(raw)
        self.log.append(event)
        if event["type"] in ("state", "progress"):
            self.state = apply_event(self.state, event) if self.state else event
        else:
            self.replies.append(event)
        return event

    async def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15) -> dict[str, Any]:
        """Wait until the seat's state satisfies ``predicate``."""
        end = time.monotonic() + timeout
        while not (self.state and predicate(self.state)):
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"state never matched; last: {json.dumps(self.state)[:1500]}")
            try:
                await self._pump(left)
            except TimeoutError:
                continue
        return self.state

    async def send(self, message: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        """Send a message and return its reply (ack or error)."""
        self.replies.clear()
        await self.comm.send_to(text_data=json.dumps(message) if not isinstance(message, str) else message)
        end = time.monotonic() + timeout
        while not self.replies:
            await self._pump(max(0.01, end - time.monotonic()))
        return self.replies.pop(0)

    async def send_raw(self, text: str, timeout: float = 10) -> dict[str, Any]:
        self.replies.clear()
        await self.comm.send_to(text_data=text)
        end = time.monotonic() + timeout
        while not self.replies:
            await self._pump(max(0.01, end - time.monotonic()))
        return self.replies.pop(0)

    def in_phase(self, round_number: int, phase: str) -> Callable[[dict[str, Any]], bool]:
        return lambda s: s.get("game", {}).get("round") == round_number and s["game"]["phase"] == phase
