"""A fake OpenAI-compatible server: real HTTP on a real socket, speaking ``POST /v1/chat/completions``.

Tests and benchmarks talk to it through the real ``openai`` client, so everything between our code
and the wire (serialisation, status codes, ``Retry-After``, timeouts, dropped connections) is the
real thing. Replies, latency and faults are scripted per test::

    with FakeOpenAI() as fake:
        fake.script(Reply.error(429, retry_after=1), Reply.text("not json"))
        ...  # point a BotProfile at fake.base_url

Requests take the scripted replies in order; once the script is empty, :attr:`FakeOpenAI.responder`
(if set) or the automatic reply answers: a valid instance of the JSON schema the request asked
for (``response_format``), so a whole game can run against it unattended.

As a command, for demos and benchmarks::

    python -m bots.fake_openai --port 8999 --latency 1.0

It uses only the standard library (an asyncio stream server), so one thread serves hundreds of
concurrent slow requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PITCH = "Hello! If you choose me I will send back half of what I receive, every round. Fair for both of us."
MAX_BODY = 4 * 1024 * 1024


@dataclass
class Reply:
    """One scripted answer. ``content=None`` (and no fault) means: answer with a valid decision."""

    content: str | None = None
    refusal: str | None = None
    status: int = 200
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    latency: float | None = None
    drop: bool = False
    raw: bytes | None = None  # sent as the body instead of a chat completion (a broken endpoint or proxy)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @classmethod
    def json(cls, value: object, **kw: Any) -> Reply:
        return cls(content=json.dumps(value), **kw)

    @classmethod
    def text(cls, content: str, **kw: Any) -> Reply:
        return cls(content=content, **kw)

    @classmethod
    def refuse(cls, message: str = "I'm sorry, but I can't help with that.", **kw: Any) -> Reply:
        return cls(refusal=message, **kw)

    @classmethod
    def error(cls, status: int, *, retry_after: float | None = None, message: str | None = None, **kw: Any) -> Reply:
        headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else {}
        kind = {429: "rate_limit_exceeded", 401: "invalid_api_key"}.get(status, "server_error")
        body = {"error": {"message": message or f"fake error {status}", "type": kind, "code": kind, "param": None}}
        return cls(status=status, body=body, headers=headers, **kw)

    @classmethod
    def slow(cls, seconds: float, **kw: Any) -> Reply:
        return cls(latency=seconds, **kw)

    @classmethod
    def hang_up(cls, **kw: Any) -> Reply:
        return cls(drop=True, **kw)

    @classmethod
    def broken(cls, raw: bytes, **kw: Any) -> Reply:
        return cls(raw=raw, **kw)


# ---- automatic answers ----------------------------------------------------------------------------

def instance_of(schema: dict[str, Any]) -> Any:
    """A valid value for the (small) JSON schema subset the bots use: objects, enums, bounded integers."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        return {name: instance_of(sub) for name, sub in schema.get("properties", {}).items()}
    if kind == "integer":
        lo, hi = schema.get("minimum", 0), schema.get("maximum", 10)
        return (lo + hi + 1) // 2
    if kind == "number":
        return (schema.get("minimum", 0) + schema.get("maximum", 1)) / 2
    if kind == "boolean":
        return True
    if kind == "array":
        return [instance_of(schema.get("items", {}))]
    if kind == "string":
        return DEFAULT_PITCH[: schema.get("maxLength", len(DEFAULT_PITCH))]
    return None


def auto_content(request: dict[str, Any]) -> str:
    response_format = request.get("response_format") or {}
    schema = (response_format.get("json_schema") or {}).get("schema")
    return json.dumps(instance_of(schema) if schema else {})


def count_tokens(text: str) -> int:
    """A stable stand-in for a tokenizer (about four characters per token), so accounting is testable."""
    return max(1, len(text) // 4)


# ---- the server --------------------------------------------------------------------------------------

class FakeOpenAI:
    """The server. Start it in a background thread (:meth:`start`, or ``with``) or run it (:meth:`serve`)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency: float = 0.0, model: str = "fake-model") -> None:
        self.host, self.port, self.latency, self.model = host, port, latency, model
        self.responder: Callable[[dict[str, Any]], Reply | None] | None = None
        self.requests: list[dict[str, Any]] = []
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.in_flight = 0
        self.most_in_flight = 0  # the largest number of requests it was answering at once (limits: tests/bots/test_limits.py)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._script.extend(replies)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self.most_in_flight = 0
        self.responder = None

    def _next_reply(self, request: dict[str, Any]) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self._script:
                return self._script.popleft()
        reply = self.responder(request) if self.responder else None
        return reply or Reply()

    # -- lifecycle

    def start(self) -> FakeOpenAI:
        self._thread = threading.Thread(target=self._run_thread, name="fake-openai", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake OpenAI server did not start")
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is not None and server is not None and not loop.is_closed():
            loop.call_soon_threadsafe(server.close)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run_thread(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.run_until_complete(self._listen())
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port, backlog=2048)
        self.port = self._server.sockets[0].getsockname()[1]

    async def serve(self) -> None:
        """Run in the current event loop until cancelled (the command-line entry point)."""
        await self._listen()
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    # -- HTTP/1.1, just enough of it: request line, headers, Content-Length body, keep-alive

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                length = int(headers.get("content-length", "0"))
                if length > MAX_BODY:
                    await self._send(writer, 413, {"error": {"message": "too large"}})
                    return
                body = await reader.readexactly(length) if length else b""
                keep = await self._route(method, path, headers, body, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _route(self, method: str, path: str, headers: dict[str, str], body: bytes,
                     writer: asyncio.StreamWriter) -> bool:
        path = path.split("?", 1)[0].rstrip("/")
        if method == "GET" and path.endswith("/models"):
            await self._send(writer, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
            return True
        if method != "POST" or not path.endswith("/chat/completions"):
            await self._send(writer, 404, {"error": {"message": f"no route {method} {path}"}})
            return True
        try:
            request = json.loads(body)
        except ValueError:
            await self._send(writer, 400, {"error": {"message": "body is not JSON"}})
            return True
        request["_headers"] = {k: v for k, v in headers.items() if k in ("authorization", "api-key")}
        reply = self._next_reply(request)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.latency if reply.latency is None else reply.latency)
        finally:
            self.in_flight -= 1
        if reply.drop:
            writer.transport.abort()
            return False
        if reply.raw is not None:
            await self._send(writer, reply.status, reply.raw, reply.headers)
        elif reply.status != 200:
            await self._send(writer, reply.status, reply.body or {"error": {"message": "error"}}, reply.headers)
        else:
            await self._send(writer, 200, self._completion(request, reply), reply.headers)
        return True

    def _completion(self, request: dict[str, Any], reply: Reply) -> dict[str, Any]:
        content = None if reply.refusal is not None else (reply.content if reply.content is not None else auto_content(request))
        prompt = "".join(str(m.get("content") or "") for m in request.get("messages", []))
        tokens_in = reply.prompt_tokens if reply.prompt_tokens is not None else count_tokens(prompt)
        tokens_out = reply.completion_tokens if reply.completion_tokens is not None else count_tokens(content or reply.refusal or "")
        return {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model") or self.model,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content, "refusal": reply.refusal}}],
            "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "total_tokens": tokens_in + tokens_out},
        }

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, payload: dict[str, Any] | bytes,
                    headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 413: "Payload Too Large",
                  429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Status")
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
                     f"{extra}\r\n".encode("latin-1") + data)
        await writer.drain()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible server for demos, tests and benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8999)
    parser.add_argument("--latency", type=float, default=1.0, help="seconds before each reply (default 1.0)")
    parser.add_argument("--model", default="fake-model")
    args = parser.parse_args(argv)
    fake = FakeOpenAI(host=args.host, port=args.port, latency=args.latency, model=args.model)
    print(f"fake OpenAI server on http://{args.host}:{args.port}/v1 (latency {args.latency:g} s); Ctrl-C stops it", flush=True)
    run = asyncio.run
    with contextlib.suppress(ImportError):  # uvloop (installed with uvicorn[standard]) halves the server's CPU per reply
        import uvloop

        run = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        run(fake.serve())


if __name__ == "__main__":
    main()
