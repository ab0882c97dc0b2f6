"""Fixtures for the browser tests: the platform as a real server, Debian's Chromium, and the people.

The server is what `make run` starts (uvicorn serving ``config.asgi:application`` on the embedded
default: SQLite, in-memory channel layer, in-process scheduler), on its own SQLite file in a temporary
directory, with the test designs and sessions created before it starts (``tests/e2e/setup_game.py``).
One server and one browser serve the whole module; every test plays its own session and every person
gets a browser context of their own (own cookies, so two people in one browser are two participants).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from tests.e2e.participant import Person, Shots
from tests.livestack import PYTHON, Proc, Processes, clean_env, free_ports, run_command

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
START_SECONDS = 120
# The machine has 2 cores shared with other work: every wait is generous. A wait ends as soon as its
# condition holds, so a generous bound costs nothing when things go well.
TIMEOUT_MS = 45_000

expect.set_options(timeout=TIMEOUT_MS)


class Platform:
    """The running server, its database and the sessions prepared for the tests."""

    def __init__(self, *, server: Proc, port: int, db: Path, sessions: dict[str, Any], env: dict[str, str]) -> None:
        self.server, self.port, self.db, self.sessions, self.env = server, port, db, sessions, env

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def join_url(self, test: str) -> str:
        return self.url(f"/join/{self.sessions[test]['code']}/")

    def manage(self, *args: str, timeout: float = 300) -> str:
        """Run a management command against the server's database; fail with its output unless it exits 0."""
        return run_command([PYTHON, "manage.py", *args], env=self.env, timeout=timeout)

    def rows(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        """Read the server's database directly (read-only; WAL lets it run beside the server)."""
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)) as db:
            db.row_factory = sqlite3.Row
            return db.execute(sql, params).fetchall()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    tmp = tmp_path_factory.mktemp("e2e-server")
    db = tmp / "partnerlab.sqlite3"
    env = clean_env(DJANGO_SETTINGS_MODULE="config.settings.local", PARTNERLAB_SQLITE_PATH=str(db),
                    PARTNERLAB_VAR_DIR=str(tmp / "var"))
    run_command([PYTHON, "manage.py", "migrate", "--noinput"], env=env, timeout=300)
    out = run_command([PYTHON, "manage.py", "shell", "-c", "from tests.e2e.setup_game import prepare_json; prepare_json()"],
                      env=env, timeout=120)
    sessions = json.loads(out.strip().splitlines()[-1])
    procs = Processes(tmp)
    try:
        port = free_ports(1)[0]
        server = procs.start("uvicorn", [PYTHON, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1",
                                         "--port", str(port), "--lifespan", "on"], env=env)
        server.wait_for_http(port, timeout=START_SECONDS)
        yield Platform(server=server, port=port, db=db, sessions=sessions, env=env)
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        # Same policy as PostgreSQL/Redis: CI (PARTNERLAB_TEST_SERVICES=require) fails; a fresh laptop skips, loudly.
        message = (f"The browser tests need Debian's Chromium at {CHROMIUM}, which is missing. "
                   "Install it with `apt-get install chromium` (.ci/run does this in CI).")
        if os.environ.get("PARTNERLAB_TEST_SERVICES") == "require":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Shots:
    folder = ARTIFACTS / re.sub(r"[^\w.-]+", "_", request.node.name)
    shutil.rmtree(folder, ignore_errors=True)
    return Shots(folder)


@pytest.fixture
def people(browser: Browser, platform: Platform, shots: Shots, request: pytest.FixtureRequest) -> Iterator[Callable[..., Person]]:
    """``people(name, **context_options)``: a person with a fresh browser context and one page."""
    made: list[Person] = []

    def make(name: str, **context_options: Any) -> Person:
        context = browser.new_context(**context_options)
        context.set_default_timeout(TIMEOUT_MS)
        person = Person(name=name, page=context.new_page(), platform=platform, shots=shots)
        made.append(person)
        return person

    log_start = len(platform.server.log())
    yield make
    failed = getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed
    try:
        for person in made:
            if failed:
                with contextlib.suppress(Exception):
                    shots.take(person.page, f"FAILED-{person.name}")
        if failed:
            print(f"\n===== server log during {request.node.name} =====\n{platform.server.log()[log_start:][-20_000:]}")
        else:
            problems = [f"{p.name}: {e}" for p in made for e in p.page_errors]
            assert not problems, f"JavaScript errors on the participant page: {problems}"
            assert "Traceback" not in platform.server.log()[log_start:], platform.server.log()[log_start:][-20_000:]
    finally:
        for person in made:
            with contextlib.suppress(Exception):
                person.page.context.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the test item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
