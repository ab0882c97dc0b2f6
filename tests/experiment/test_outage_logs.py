"""A Redis outage is said in one log line per failure, not a traceback each (the fault benchmark's finding:
a 3-second Redis restart wrote 30 tracebacks into one web process's log)."""

from __future__ import annotations

import concurrent.futures
import logging
from unittest import mock

import kombu.exceptions
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from experiment import events, scheduling


def _failed(exc: BaseException) -> concurrent.futures.Future[None]:
    future: concurrent.futures.Future[None] = concurrent.futures.Future()
    future.set_exception(exc)
    return future


@pytest.mark.parametrize("exc", [kombu.exceptions.OperationalError("Error 111 connecting to 127.0.0.1:6390."),
                                 RedisConnectionError("Connection closed by server."), ConnectionRefusedError(111, "refused")])
def test_a_broker_that_is_down_is_one_warning_without_a_traceback(caplog, exc: BaseException) -> None:
    with caplog.at_level(logging.WARNING, logger=scheduling.logger.name):
        scheduling._report_failure(_failed(exc))
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.exc_info is None and str(exc) in record.getMessage()


def test_any_other_failure_to_hand_a_job_over_keeps_its_traceback(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=scheduling.logger.name):
        scheduling._report_failure(_failed(ValueError("a bug")))
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None


class _DownLayer:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def group_send(self, group: str, message: dict) -> None:
        raise self.exc


@pytest.mark.parametrize("exc, level, traceback", [(RedisConnectionError("Connection has data"), logging.WARNING, False),
                                                    (RuntimeError("a bug"), logging.ERROR, True)])
def test_a_broadcast_while_redis_is_down_is_one_warning(caplog, exc: BaseException, level: int, traceback: bool) -> None:
    with mock.patch.object(events, "get_channel_layer", return_value=_DownLayer(exc)), \
            caplog.at_level(logging.WARNING, logger=events.logger.name):
        broadcaster = events._Broadcaster()
        broadcaster.put("group-1", {"type": "seat.refresh"})
        assert broadcaster.idle.wait(5)
    (record,) = [r for r in caplog.records if "broadcast to group-1 failed" in r.getMessage()]
    assert record.levelno == level and (record.exc_info is not None) == traceback
