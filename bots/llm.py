"""A small typed wrapper around the ``openai`` client: one chat completion in, one :class:`ChatResult` out.

It never raises for a failed request: the result carries the error class, a message in plain words,
the HTTP status and ``Retry-After``, and whether trying again can help (``transient``). The client is
built with ``max_retries=0`` so that every retry is ours: recorded, bounded by the phase deadline and
spaced by the endpoint's ``Retry-After``.

Clients are cached (connection pools are expensive): sync clients per process, async clients per
event loop. The async client uses the aiohttp transport, which keeps hundreds of concurrent calls
cheap (``bench/bots.py``).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx2
import openai

from experiment.game import escape_unstorable

if TYPE_CHECKING:
    from bots.models import BotProfile

# Sent to keyless local endpoints (vLLM, Ollama): the client insists on some key, they ignore it.
KEYLESS_PLACEHOLDER = "not-needed"
MAX_RETRY_AFTER = 120.0
POOL_LIMITS = httpx2.Limits(max_connections=2000, max_keepalive_connections=2000, keepalive_expiry=300.0)


class MissingKey(RuntimeError):
    """The profile needs a key and its environment variable is not set in this process."""


@dataclass(frozen=True)
class LLMSettings:
    """Everything a request needs, resolved from a profile (the key from the environment)."""

    base_url: str
    api_key: str = field(repr=False)
    model: str
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    max_tokens: int = 400
    max_tokens_param: str = "max_completion_tokens"
    response_format_mode: str = "json_schema"
    timeout: float = 20.0

    @classmethod
    def from_profile(cls, profile: BotProfile, *, timeout: float | None = None) -> LLMSettings:
        key = profile.api_key()
        if key is None and profile.requires_key:
            raise MissingKey(f"The environment variable {profile.api_key_env} (the API key of profile "
                             f"{profile.name!r}) is not set in this process.")
        return cls(base_url=profile.base_url, api_key=key or KEYLESS_PLACEHOLDER, model=profile.model,
                   temperature=profile.temperature, top_p=profile.top_p, seed=profile.seed,
                   max_tokens=profile.max_tokens, max_tokens_param=profile.max_tokens_param,
                   response_format_mode=profile.response_format,
                   timeout=profile.timeout_seconds if timeout is None else timeout)

    def parameters(self) -> dict[str, Any]:
        """What is recorded with each call (never the key)."""
        return {"base_url": self.base_url, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                self.max_tokens_param: self.max_tokens, "response_format": self.response_format_mode,
                "timeout_seconds": self.timeout}

    def response_format(self, schema_name: str, schema: dict[str, Any]) -> dict[str, Any] | None:
        if self.response_format_mode == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": schema_name, "strict": True, "schema": schema}}
        if self.response_format_mode == "json_object":
            return {"type": "json_object"}
        return None

    def request(self, messages: list[dict[str, Any]], response_format: dict[str, Any] | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, self.max_tokens_param: self.max_tokens}
        for name in ("temperature", "top_p", "seed"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if response_format is not None:
            kwargs["response_format"] = response_format
        return kwargs


@dataclass(frozen=True)
class ChatResult:
    text: str | None = None
    refusal: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: int = 0
    model: str = ""
    finish_reason: str | None = None
    error_class: str = ""
    error_message: str = ""
    http_status: int | None = None
    retry_after: float | None = None
    transient: bool = False

    @property
    def ok(self) -> bool:
        return not self.error_class


# ---- clients ---------------------------------------------------------------------------------------

_sync_clients: dict[tuple[str, str, float], openai.OpenAI] = {}
_async_clients: dict[tuple[int, str, str, float], openai.AsyncOpenAI] = {}
_lock = threading.Lock()


def sync_client(settings: LLMSettings) -> openai.OpenAI:
    key = (settings.base_url, settings.api_key, settings.timeout)
    with _lock:
        client = _sync_clients.get(key)
        if client is None:
            client = _sync_clients[key] = openai.OpenAI(base_url=settings.base_url, api_key=settings.api_key,
                                                        timeout=settings.timeout, max_retries=0)
        return client


def async_client(settings: LLMSettings) -> openai.AsyncOpenAI:
    """The client for the running event loop (an aiohttp session cannot move between loops)."""
    loop = asyncio.get_running_loop()
    key = (id(loop), settings.base_url, settings.api_key, settings.timeout)
    client = _async_clients.get(key)
    if client is None:
        # Bots call in bursts, one per phase opening: keep connections (and their TLS sessions) open between
        # phases instead of the default 5 s, and let a burst of hundreds of calls each have its own.
        client = _async_clients[key] = openai.AsyncOpenAI(
            base_url=settings.base_url, api_key=settings.api_key, timeout=settings.timeout, max_retries=0,
            http_client=openai.DefaultAioHttpClient(timeout=settings.timeout, limits=POOL_LIMITS))
    return client


async def close_async_clients() -> None:
    """Close the clients of the running loop (call before the loop stops)."""
    loop_id = id(asyncio.get_running_loop())
    for key in [k for k in _async_clients if k[0] == loop_id]:
        await _async_clients.pop(key).close()


# ---- calls -------------------------------------------------------------------------------------------

# The request body is built here, in full, and recorded as sent; it goes through the client's ``post``
# (auth, base URL, timeouts, HTTP errors as typed exceptions) rather than ``chat.completions.create``,
# whose walk of the parameters' TypedDicts does nothing to plain JSON yet costs about a third of the
# client's CPU per call. The reply is read as bytes and picked apart here instead of being validated into
# the SDK's ``ChatCompletion`` model: we need five fields of it, and with hundreds of bots answering at
# once the model's construction was most of what was left (bench/bots.py).
CHAT_PATH = "/chat/completions"


def complete(settings: LLMSettings, messages: list[dict[str, Any]], response_format: dict[str, Any] | None) -> ChatResult:
    """One chat completion, synchronously (the admin's "Test this profile" button)."""
    started = time.perf_counter()
    try:
        body = sync_client(settings).post(CHAT_PATH, body=settings.request(messages, response_format), cast_to=bytes)
    except Exception as exc:
        return failure(exc, settings, started)
    return success(body, started)


async def acomplete(settings: LLMSettings, messages: list[dict[str, Any]],
                    response_format: dict[str, Any] | None) -> ChatResult:
    """One chat completion on the running event loop (every bot turn: ``bots.decisions.background``)."""
    started = time.perf_counter()
    try:
        body = await async_client(settings).post(CHAT_PATH, body=settings.request(messages, response_format), cast_to=bytes)
    except Exception as exc:
        return failure(exc, settings, started)
    return success(body, started)


def _elapsed_ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _text_or_none(value: Any) -> str | None:
    """A text field of the reply, storable: a model (or a broken endpoint) can send NUL or half a surrogate
    pair in valid JSON, which PostgreSQL would refuse in the call log and in the next request's messages."""
    return escape_unstorable(value) if isinstance(value, str) else None


def success(body: bytes, started: float) -> ChatResult:
    """The result of an HTTP 200 reply's body. Endpoints differ (and some are broken): every field is
    checked for its type, and a body that is not a chat completion is an error, not an exception."""
    latency = _elapsed_ms(started)
    try:
        completion = json.loads(body)
    except (ValueError, RecursionError):
        # A proxy's error page, a cut body: the next attempt may well get a real answer.
        return ChatResult(latency_ms=latency, error_class="MalformedReply", transient=True,
                          error_message=f"The endpoint answered HTTP 200 with a body that is not JSON: {body[:200]!r}")
    if not isinstance(completion, dict):
        return ChatResult(latency_ms=latency, error_class="MalformedReply",
                          error_message="The endpoint answered with JSON that is not a chat completion object.")
    choices = completion.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    if first is None:
        return ChatResult(latency_ms=latency, error_class="EmptyReply",
                          error_message="The endpoint answered without any choice.")
    message = first.get("message") if isinstance(first.get("message"), dict) else {}
    usage = completion.get("usage") if isinstance(completion.get("usage"), dict) else {}
    return ChatResult(
        text=_text_or_none(message.get("content")), refusal=_text_or_none(message.get("refusal")),
        tokens_in=_count(usage.get("prompt_tokens")), tokens_out=_count(usage.get("completion_tokens")),
        latency_ms=latency, model=_text_or_none(completion.get("model")) or "",
        finish_reason=_text_or_none(first.get("finish_reason")),
    )


def failure(exc: BaseException, settings: LLMSettings, started: float) -> ChatResult:
    """Describe a failed request in plain words, and say whether retrying can help."""
    latency = _elapsed_ms(started)
    name = type(exc).__name__
    if isinstance(exc, openai.APITimeoutError) and (refused := _connection_failure(exc)) is not None:
        # The aiohttp transport reports a refused or failed connection as a connect *timeout*; it is not one.
        exc, name = openai.APIConnectionError(request=exc.request), "APIConnectionError"
        exc.__cause__ = refused
    if isinstance(exc, openai.APITimeoutError):
        return timed_out(settings, latency, settings.timeout)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        detail = f" ({type(cause).__name__}: {cause})" if cause else ""
        return ChatResult(latency_ms=latency, error_class=name, transient=True,
                          error_message=f"Could not talk to {settings.base_url}: the connection failed or was cut{detail}. "
                                        "Is the server running and the base URL right?")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retry_after = retry_after_seconds(exc.response.headers)
        transient = status in (408, 409, 429) or status >= 500
        hint = {401: " The endpoint refused the API key: check the key's environment variable.",
                403: " The key is not allowed to use this model or endpoint.",
                404: f" The model {settings.model!r} or the URL was not found: check the model name and base URL.",
                429: " The endpoint is rate-limiting requests.",
                }.get(status, " The endpoint failed." if status >= 500 else "")
        return ChatResult(latency_ms=latency, error_class=name, http_status=status, retry_after=retry_after,
                          transient=transient,
                          error_message=escape_unstorable(f"HTTP {status}: {exc.message}.{hint}".replace("..", ".")))
    return ChatResult(latency_ms=latency, error_class=name, error_message=f"Unexpected failure: {exc}")


def timed_out(settings: LLMSettings, latency_ms: int, seconds: float) -> ChatResult:
    """No reply within ``seconds``: worth another try."""
    return ChatResult(latency_ms=latency_ms, error_class="APITimeoutError", transient=True,
                      error_message=f"No reply from {settings.base_url} within {seconds:g} s.")


def _connection_failure(exc: BaseException) -> OSError | None:
    """The operating system's connection error behind ``exc`` (refused, reset, unknown host), if any."""
    seen = 0
    cause = exc.__cause__ or exc.__context__
    while cause is not None and seen < 10:
        if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
            return cause
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds the endpoint asks us to wait (``retry-after-ms``, ``retry-after`` seconds or HTTP date)."""
    try:
        millis = headers.get("retry-after-ms")
        if millis is not None:
            return min(MAX_RETRY_AFTER, max(0.0, float(millis) / 1000))
        value = headers.get("retry-after")
    except (AttributeError, ValueError):
        return None
    if value is None:
        return None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, when.timestamp() - time.time()))
