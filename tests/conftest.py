from __future__ import annotations

import asyncio
import contextlib

import pytest
from django.conf import settings

from experiment.scheduling import runner
from experiment.selectors import clear_kept


@pytest.fixture(autouse=True)
def _empty_runner():
    runner.clear()
    yield
    runner.clear()


@pytest.fixture(autouse=True)
def _no_kept_group_parts():
    """Each test starts without the group parts an earlier test's views kept in this process."""
    clear_kept()
    yield
    clear_kept()


@pytest.fixture
async def scheduler():
    """The in-process scheduler (embedded default) running in the test's event loop."""
    task = asyncio.create_task(runner.run(sweep_every=0.2))
    await asyncio.sleep(0)
    yield runner
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.fixture
def production_services():
    """Fails (never skips) in CI when PostgreSQL/Redis are missing; test settings already enforce it."""
    if not settings.PRODUCTION_SERVICES:
        pytest.skip("PostgreSQL/Redis not reachable on this machine (CI requires them)")


def pytest_addoption(parser):
    parser.addoption("--update-protocol-examples", action="store_true",
                     help="write the JSON examples of docs/protocol.md from a fresh capture "
                          "(tests/experiment/test_protocol_examples.py)")
