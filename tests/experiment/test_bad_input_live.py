"""Hostile frames against the production stack: uvicorn's own websocket implementation, PostgreSQL, Redis.

The in-process bad-input tests (test_bad_input.py) hand frames to the consumer as Python strings, so they
cannot send what only a TCP client can: bytes that are not UTF-8 in a text frame. And text PostgreSQL
refuses (NUL, lone surrogates) must be refused before it reaches the database here too, with one error
reply and the connection kept.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from experiment.models import Message, Participant
from tests.experiment import gamekit
from tests.experiment.test_production_stack import Stack, stack, static_root  # noqa: F401 (fixtures)
from tests.livestack import LiveSeat

pytestmark = [pytest.mark.production_stack, pytest.mark.django_db(transaction=True)]

P = Participant
SEAT_MESSAGE = ("The text contains a character that cannot be stored (a NUL character or half of an emoji or "
                "other character).")
INVALID_UTF8 = [b"\xff\xfe", b'{"type":"ping","ref":"\xc3"}', b"\xed\xa0\xbd surrogate as UTF-8", b"ok \x80"]


def _candidate_token() -> tuple[int, str]:
    group = gamekit.group_start(pitch_seconds=600)
    seat = next(p for p in gamekit.seats(group).values()
                if p.role == P.Role.CANDIDATE and p.controller == P.Controller.PERSON)
    return group.pk, seat.token


async def _closed_by(port: int, token: str, frame: bytes) -> int | None:
    async with connect(f"ws://127.0.0.1:{port}/ws/play/{token}/", origin=f"http://127.0.0.1:{port}",
                       proxy=None, open_timeout=20) as ws:
        await ws.recv()  # the first state
        await ws.send(frame, text=True)  # sent as a text frame, as is: the client does not check it
        try:
            while True:
                await asyncio.wait_for(ws.recv(), timeout=10)
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None
    return None


async def _hostile(live: Stack, group_id: int, token: str) -> None:
    port_a, port_b = live.web_ports
    seat = await LiveSeat(port=port_a, token=token).connect()
    for bad in ("\\ud83d broken", "a\\u0000b", "x\\udfff"):
        raw = f'{{"type":"pitch.submit","round":1,"text":"{bad}","ref":"hostile"}}'
        seat.replies.clear()
        assert seat.ws is not None
        await seat.ws.send(raw)
        while not seat.replies:
            await seat._pump(10)
        assert seat.replies.pop() == {"type": "error", "ref": "hostile", "code": "invalid_text",
                                      "message": SEAT_MESSAGE}, raw
    assert (await seat.send({"type": "ping", "ref": "alive"}))["type"] == "ack"
    await seat.act({"type": "pitch.submit", "round": 1, "text": "fine after all \U0001f600"})
    await seat.close()
    # Each process, several times: every connection is closed 1007 (invalid payload) by the server.
    codes = [await _closed_by(port, token, frame) for port in (port_a, port_b) for frame in INVALID_UTF8]
    assert codes == [1007] * len(codes), codes


def test_hostile_text_and_invalid_utf8_frames_on_the_production_stack(stack: Stack) -> None:  # noqa: F811
    group_id, token = _candidate_token()
    stack.start_web()
    asyncio.run(_hostile(stack, group_id, token))
    assert list(Message.objects.filter(group_id=group_id).values_list("text", flat=True)) == ["fine after all \U0001f600"]
    logs = stack.logs()
    assert "Traceback" not in logs and not re.search(r"\bERROR\b", logs), logs[-3000:]
    # At most one line per process and minute about the invalid frames, with their count.
    lines = re.findall(r".*invalid UTF-8.*", logs)
    assert 1 <= len(lines) <= len(stack.web_ports), lines
    assert all(re.search(r": \d+ since the previous line", line) for line in lines), lines
