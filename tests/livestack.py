"""Real processes for tests that prove the deployment paths: uvicorn servers, Celery workers, `make run`.

Each process runs in its own process group (so stopping it also stops its children: uvicorn's
workers, Celery's pool and embedded beat), writes its output to a log file, and is waited for with a
bounded timeout. :class:`Processes` stops everything it started, always, and prints the logs when the
test failed. :class:`LiveSeat` is a participant over a real TCP websocket (the ``websockets`` client).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from experiment.events import apply_event

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# Variables of the calling shell that would leak a configuration into the processes under test.
_LEAKY_PREFIXES = ("DJANGO_", "PARTNERLAB_", "CELERY_")
_LEAKY_NAMES = {"DATABASE_URL", "REDIS_URL", "TEST_DATABASE_URL", "TEST_REDIS_URL"}


def clean_env(**values: str) -> dict[str, str]:
    """The current environment without any PartnerLab/Django configuration, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY_PREFIXES) and k not in _LEAKY_NAMES}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(values)
    return env


def allowed_ports() -> list[int]:
    """The ports these tests may bind: ``PARTNERLAB_TEST_PORTS`` ("8201-8209" by default)."""
    spec = os.environ.get("PARTNERLAB_TEST_PORTS", "8201-8209")
    first, _, last = spec.partition("-")
    return list(range(int(first), int(last or first) + 1))


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    allowed = allowed_ports()
    ports = [p for p in allowed if port_is_free(p)][:n]
    if len(ports) < n:
        raise RuntimeError(f"Need {n} free ports in {allowed[0]}-{allowed[-1]} (PARTNERLAB_TEST_PORTS); only {ports} are free.")
    return ports


def http_get(port: int, path: str, *, headers: dict[str, str] | None = None, timeout: float = 10,
             method: str = "GET", body: str | None = None) -> tuple[int, dict[str, str], str]:
    """One plain HTTP request to 127.0.0.1 (no proxy, no redirect following): status, headers, body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Host": f"127.0.0.1:{port}", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode(errors="replace")
    finally:
        conn.close()


class Proc:
    """One started process (group) with its log file."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], log_path: Path, cwd: Path = ROOT) -> None:
        self.name, self.argv, self.env, self.log_path, self.cwd = name, argv, env, log_path, cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Proc:
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.name}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.started_at = time.monotonic()
            self.popen = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def _fail(self, what: str) -> AssertionError:
        state = "running" if self.running else f"exited with {self.popen.returncode if self.popen else None}"
        return AssertionError(f"{self.name} ({state}): {what}\n--- last lines of {self.log_path} ---\n{self.tail()}")

    def wait_for_log(self, pattern: str, *, timeout: float, after: int = 0) -> re.Match[str]:
        """Wait until the log (from character ``after``) matches ``pattern``; fails if the process dies first."""
        end = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.log()[after:])
            if found:
                return found
            if not self.running:
                raise self._fail(f"ended before its log showed {pattern!r}")
            if time.monotonic() > end:
                raise self._fail(f"log did not show {pattern!r} within {timeout} s")
            time.sleep(0.1)

    def wait_for_http(self, port: int, *, path: str = "/healthz", timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, http.client.HTTPException):
                if http_get(port, path, timeout=2)[0] == 200:
                    return
            if not self.running:
                raise self._fail(f"ended before answering http://127.0.0.1:{port}{path}")
            if time.monotonic() > end:
                raise self._fail(f"http://127.0.0.1:{port}{path} did not answer 200 within {timeout} s")
            time.sleep(0.1)

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, *, timeout: float = 15) -> None:
        """A graceful stop: SIGTERM to the leader only (as a supervisor does: Celery's warm shutdown lets
        its pool finish, which a SIGTERM to every child would not), then SIGKILL to the whole group."""
        if self.popen is None:
            return
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        # Children (uvicorn workers, Celery's pool) share the group: make sure none outlives the leader.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash: nothing gets to clean up) and reap the leader."""
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


class Processes:
    """Starts processes for one test, stops all of them at the end, and shows their logs on failure."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], *, env: dict[str, str]) -> Proc:
        proc = Proc(name, argv, env=env, log_path=self.log_dir / f"{name}.log")
        self.procs.append(proc)
        return proc.start()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()

    def dump(self, lines: int = 200) -> None:
        for proc in self.procs:
            print(f"\n===== {proc.name} ({proc.log_path}), last {lines} lines =====\n{proc.tail(lines)}")


def run_command(argv: list[str], *, env: dict[str, str], timeout: float = 120, stdin: str | None = None) -> str:
    """Run a short command to completion (bounded); return its output or fail with it."""
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(argv)} did not finish within {timeout} s:\n{exc.stdout}\n{exc.stderr}") from None
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


# ---- a participant over a real websocket ----------------------------------------------------------

Predicate = Callable[[dict[str, Any]], bool]


def where(state: dict[str, Any]) -> tuple[str, int | None, str | None]:
    """Where a seat is: (stage, round, phase)."""
    game = state.get("game") or {}
    return state.get("stage", ""), game.get("round"), game.get("phase")


class LiveSeat:
    """A participant's browser, reduced to its protocol: a TCP websocket to a running server."""

    def __init__(self, *, port: int, token: str, name: str = "") -> None:
        self.port, self.token, self.name = port, token, name or token[:6]
        self.ws: ClientConnection | None = None
        self.state: dict[str, Any] = {}
        self.replies: list[dict[str, Any]] = []
        # Every distinct place the seat was shown, in order: proves which phases this client saw.
        self.seen: list[tuple[str, int | None, str | None]] = []
        # Every frame the server sent this seat, as received.
        self.frames: list[str] = []

    async def connect(self) -> LiveSeat:
        self.ws = await connect(f"ws://127.0.0.1:{self.port}/ws/play/{self.token}/",
                                origin=f"http://127.0.0.1:{self.port}", proxy=None, open_timeout=20)
        await self.until(lambda s: True)
        return self

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()

    async def _pump(self, timeout: float) -> None:
        assert self.ws is not None
        frame = await asyncio.wait_for(self.ws.recv(), timeout=timeout)
        self.frames.append(frame)
        event = json.loads(frame)
        if event["type"] in ("state", "progress"):
            self.state = apply_event(self.state, event) if self.state else event
            if event["type"] == "state" and (not self.seen or self.seen[-1] != where(event)):
                self.seen.append(where(event))
        else:
            self.replies.append(event)

    async def until(self, predicate: Predicate, timeout: float = 30) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while not (self.state and predicate(self.state)):
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"seat {self.name} on :{self.port}: state never matched; saw {self.seen}; "
                                     f"last: {json.dumps(self.state)[:1500]}")
            with contextlib.suppress(TimeoutError):
                await self._pump(left)
        return self.state

    async def saw(self, place: tuple[str, int | None, str | None], timeout: float = 30) -> None:
        """Wait until this seat has been shown ``place`` (now or earlier)."""
        end = time.monotonic() + timeout
        while place not in self.seen:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"seat {self.name} on :{self.port} never saw {place}; saw {self.seen}")
            with contextlib.suppress(TimeoutError):
                await self._pump(left)

    async def send(self, message: dict[str, Any], timeout: float = 20) -> dict[str, Any]:
        """Send one protocol message and return its reply (ack or error)."""
        assert self.ws is not None
        self.replies.clear()
        await self.ws.send(json.dumps(message))
        end = time.monotonic() + timeout
        while not self.replies:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"seat {self.name}: no reply to {message} within {timeout} s")
            with contextlib.suppress(TimeoutError):
                await self._pump(left)
        return self.replies.pop(0)

    async def act(self, message: dict[str, Any]) -> None:
        reply = await self.send(message)
        assert reply["type"] == "ack", f"seat {self.name}: {message} -> {reply}"

    async def onboard(self, quiz_answers: dict[str, str]) -> None:
        """Consent, instructions and the comprehension quiz, as a person would answer them."""
        await self.until(lambda s: s["stage"] == "consent")
        await self.act({"type": "consent", "accept": True})
        await self.act({"type": "instructions.done"})
        reply = await self.send({"type": "quiz.submit", "answers": quiz_answers})
        assert reply["type"] == "ack" and reply["result"]["correct"] is True, reply


async def all_saw(seats: list[LiveSeat], place: tuple[str, int | None, str | None], timeout: float = 30) -> None:
    await asyncio.gather(*(s.saw(place, timeout) for s in seats))


async def all_until(seats: list[LiveSeat], predicate: Predicate, timeout: float = 30) -> None:
    await asyncio.gather(*(s.until(predicate, timeout) for s in seats))


async def drain(seats: list[LiveSeat], seconds: float) -> None:
    """Keep reading every seat for a while (so that no server-side send buffer fills up)."""
    end = time.monotonic() + seconds

    async def one(seat: LiveSeat) -> None:
        while (left := end - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await seat._pump(left)

    await asyncio.gather(*(one(s) for s in seats))
