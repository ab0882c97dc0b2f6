"""The typed wrapper around the real ``openai`` client, against the fake server over real HTTP."""

from __future__ import annotations

import asyncio
import socket

import pytest

from bots import llm
from bots.fake_openai import FakeOpenAI, Reply

MESSAGES = [{"role": "system", "content": "You play a game."}, {"role": "user", "content": "Answer with JSON."}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "choice", "strict": True, "schema": {
    "type": "object", "properties": {"amount": {"type": "integer", "minimum": 0, "maximum": 10}},
    "required": ["amount"], "additionalProperties": False}}}


def settings_for(base_url: str, **fields: object) -> llm.LLMSettings:
    values: dict = {"base_url": base_url, "api_key": "sk-test", "model": "fake-model", "temperature": 0.7, "seed": 42,
                    "max_tokens": 123, "timeout": 2.0}
    values.update(fields)
    return llm.LLMSettings(**values)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_reply_with_its_tokens_and_the_request_as_sent(fake: FakeOpenAI) -> None:
    fake.script(Reply.json({"amount": 4}, prompt_tokens=1200, completion_tokens=30))
    result = llm.complete(settings_for(fake.base_url), MESSAGES, FORMAT)
    assert result.ok and result.text == '{"amount": 4}' and result.refusal is None
    assert (result.tokens_in, result.tokens_out, result.model) == (1200, 30, "fake-model")
    assert result.latency_ms >= 0
    sent = fake.requests[0]
    assert sent["messages"] == MESSAGES and sent["response_format"] == FORMAT
    assert (sent["temperature"], sent["seed"], sent["max_completion_tokens"]) == (0.7, 42, 123)
    assert "top_p" not in sent  # unset parameters are not sent: the provider's default applies
    assert sent["_headers"]["authorization"] == "Bearer sk-test"


def test_the_async_client_gives_the_same_result(fake: FakeOpenAI) -> None:
    fake.script(Reply.json({"amount": 9}, prompt_tokens=10, completion_tokens=3))

    async def go() -> llm.ChatResult:
        try:
            return await llm.acomplete(settings_for(fake.base_url, max_tokens_param="max_tokens"), MESSAGES, FORMAT)
        finally:
            await llm.close_async_clients()

    result = asyncio.run(go())
    assert result.ok and result.text == '{"amount": 9}' and (result.tokens_in, result.tokens_out) == (10, 3)
    assert fake.requests[0]["max_tokens"] == 123 and "max_completion_tokens" not in fake.requests[0]


def test_rate_limit_carries_retry_after(fake: FakeOpenAI) -> None:
    fake.script(Reply.error(429, retry_after=7))
    result = llm.complete(settings_for(fake.base_url), MESSAGES, FORMAT)
    assert (result.ok, result.error_class, result.http_status, result.retry_after, result.transient) == (
        False, "RateLimitError", 429, 7.0, True)
    assert "rate-limiting" in result.error_message
    assert len(fake.requests) == 1  # max_retries=0: no hidden retry inside the client


@pytest.mark.parametrize(("reply", "error_class", "transient"), [
    (Reply.error(500), "InternalServerError", True),
    (Reply.error(503), "InternalServerError", True),
    (Reply.error(401, message="Incorrect API key provided"), "AuthenticationError", False),
    (Reply.error(404, message="The model does not exist"), "NotFoundError", False),
    (Reply.hang_up(), "APIConnectionError", True),
    (Reply.slow(3.0), "APITimeoutError", True),
])
def test_failures_are_described_not_raised(fake: FakeOpenAI, reply: Reply, error_class: str, transient: bool) -> None:
    fake.script(reply)
    result = llm.complete(settings_for(fake.base_url, timeout=1.0), MESSAGES, FORMAT)
    assert (result.ok, result.error_class, result.transient) == (False, error_class, transient)
    assert result.error_message and result.text is None
    if error_class == "APITimeoutError":
        assert 900 <= result.latency_ms < 2900
        assert "within 1 s" in result.error_message


def test_connection_refused_is_a_plain_words_error() -> None:
    result = llm.complete(settings_for(f"http://127.0.0.1:{closed_port()}/v1"), MESSAGES, FORMAT)
    assert (result.ok, result.error_class, result.transient) == (False, "APIConnectionError", True)
    assert "Is the server running and the base URL right?" in result.error_message


def test_connection_refused_on_the_async_client_is_not_called_a_timeout() -> None:
    # The aiohttp transport maps a refused connection to a connect timeout; the result says what happened.
    async def go() -> llm.ChatResult:
        try:
            return await llm.acomplete(settings_for(f"http://127.0.0.1:{closed_port()}/v1", timeout=5.0), MESSAGES, FORMAT)
        finally:
            await llm.close_async_clients()

    result = asyncio.run(go())
    assert (result.ok, result.error_class, result.transient) == (False, "APIConnectionError", True)
    assert "Is the server running and the base URL right?" in result.error_message
    assert result.latency_ms < 4000


def test_a_timeout_on_the_async_client_stays_a_timeout(fake: FakeOpenAI) -> None:
    fake.script(Reply.slow(3.0))

    async def go() -> llm.ChatResult:
        try:
            return await llm.acomplete(settings_for(fake.base_url, timeout=1.0), MESSAGES, FORMAT)
        finally:
            await llm.close_async_clients()

    result = asyncio.run(go())
    assert (result.ok, result.error_class, result.transient) == (False, "APITimeoutError", True)
    assert "within 1 s" in result.error_message


def test_a_refusal_is_a_reply_without_content(fake: FakeOpenAI) -> None:
    fake.script(Reply.refuse("I can't take part in games."))
    result = llm.complete(settings_for(fake.base_url), MESSAGES, FORMAT)
    assert result.ok and result.text is None and result.refusal == "I can't take part in games."


def test_characters_no_database_stores_come_back_as_their_json_escapes(fake: FakeOpenAI) -> None:
    fake.script(Reply.broken(b'{"model": "m\\u0000", "choices": [{"message": {"content": "a\\u0000b \\ud83d\\ude00 \\udc00",'
                             b' "refusal": "no\\ud800"}}]}'))
    result = llm.complete(settings_for(fake.base_url), MESSAGES, FORMAT)
    assert result.ok
    assert (result.text, result.refusal, result.model) == ("a\\u0000b \U0001f600 \\udc00", "no\\ud800", "m\\u0000")


@pytest.mark.parametrize(("raw", "error_class", "transient"), [
    (b"<html>502 Bad Gateway</html>", "MalformedReply", True),  # a proxy's page with status 200
    (b'{"choices": [', "MalformedReply", True),  # cut off
    (b'["not", "an", "object"]', "MalformedReply", False),
    (b'{"id": "x", "choices": []}', "EmptyReply", False),
    (b'{"choices": ["text"]}', "EmptyReply", False),
])
def test_a_broken_200_body_is_an_error_not_an_exception(fake: FakeOpenAI, raw: bytes, error_class: str,
                                                        transient: bool) -> None:
    fake.script(Reply.broken(raw))
    result = llm.complete(settings_for(fake.base_url), MESSAGES, FORMAT)
    assert (result.ok, result.error_class, result.transient, result.text) == (False, error_class, transient, None)
    assert result.error_message


def test_fields_of_the_wrong_type_are_ignored_not_trusted(fake: FakeOpenAI) -> None:
    fake.script(Reply.broken(b'{"model": 7, "choices": [{"finish_reason": "stop", "message": {"content": {"amount": 3},'
                             b' "refusal": null}}], "usage": {"prompt_tokens": "many", "completion_tokens": -4}}'))
    result = llm.complete(settings_for(fake.base_url), MESSAGES, FORMAT)
    # A content that is not a string is no answer: the caller's corrective retry and fallback apply.
    assert result.ok and result.text is None and result.refusal is None
    assert (result.tokens_in, result.tokens_out, result.model, result.finish_reason) == (0, 0, "", "stop")


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"retry-after": "3"}, 3.0), ({"retry-after-ms": "1500"}, 1.5), ({"retry-after": "1000"}, llm.MAX_RETRY_AFTER),
    ({"retry-after": "soon"}, None), ({}, None),
])
def test_retry_after_header_forms(headers: dict[str, str], seconds: float | None) -> None:
    assert llm.retry_after_seconds(headers) == seconds
