"""When the database has no connection to give: a retrying "busy" answer instead of an error.

At a recruitment launch hundreds of people open the join link within a minute. When PostgreSQL (or the
connection pool in front of it) has no connection left, getting one fails with an ``OperationalError``:
the pool's ``PoolTimeout`` after its wait, or the server's ``FATAL: sorry, too many clients already``.
Without this module that is an HTTP 500 and the person is lost. With it, the request is answered
``503`` with ``Retry-After`` and a page that tries the same URL (query string included, so the
recruitment ids come along) again by itself after a few seconds; the participant websocket closes
with ``BUSY_CLOSE_CODE``, which the game page treats as "try again later".

What counts as "no connection" is deliberately narrow (``connection_unavailable``): an
``OperationalError`` raised while Django was *opening* a connection (inside
``BaseDatabaseWrapper.connect``, which is where the pool is asked and where the server refuses), or a
``PoolTimeout``. An ``OperationalError`` from a query on a connection already open (a deadlock, a
statement or lock timeout, a connection dropped mid-transaction) is a real error and stays a 500.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
import time

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.utils import OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string
from django.utils.deprecation import MiddlewareMixin

try:
    from psycopg_pool import PoolTimeout
except ImportError:  # the pool is optional; without it nothing raises PoolTimeout
    PoolTimeout = None

logger = logging.getLogger("experiment.busy")

# Close code of the participant websocket when the database gave no connection: "try again later"
# (HTTP 503 + 4000, like 4404 and 4403). docs/protocol.md, section 2.
BUSY_CLOSE_CODE = 4503
# Retry-After, in whole seconds (what HTTP allows), drawn per answer so that the retries of the many
# people who were turned away at the same moment spread over the window instead of coming back together.
RETRY_AFTER_MIN = 3
RETRY_AFTER_MAX = 8
# At most one log line per this many seconds and process; the lines in between are counted, not written.
LOG_EVERY_SECONDS = 10.0

_CONNECT_CODE = inspect.unwrap(BaseDatabaseWrapper.connect).__code__


def _driver_errors() -> tuple[type[BaseException], ...]:
    """``OperationalError`` of Django and of every configured database driver (psycopg, sqlite3)."""
    found: set[type[BaseException]] = {OperationalError}
    for alias in connections:
        found.add(connections[alias].Database.OperationalError)
    return tuple(found)


def _raised_while_connecting(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is _CONNECT_CODE:
            return True
        tb = tb.tb_next
    return False


def connection_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means "the database gave this request no connection" (see the module docstring).

    Django re-raises a driver's error as its own (``raise ... from driver_error``) with the driver's
    traceback, so the frames of ``connect`` are on the traceback of either; ``PoolTimeout`` is looked
    for along the ``__cause__`` chain.
    """
    if not isinstance(exc, _driver_errors()):
        return False
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if PoolTimeout is not None and isinstance(current, PoolTimeout):
            return True
        if _raised_while_connecting(current):
            return True
        current = current.__cause__
    return False


class _Reporter:
    """One warning line for the first busy answer, then at most one per ``LOG_EVERY_SECONDS`` with the
    number of busy answers since the last line: a launch turns hundreds away, and hundreds of lines
    (or tracebacks) would bury everything else in the log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._since = 0

    def __call__(self, where: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self._since += 1
            if now - self._last < LOG_EVERY_SECONDS:
                return
            count, self._since, self._last = self._since, 0, now
        cause = exc.__cause__ or exc
        detail = (str(cause).strip().splitlines() or [""])[0][:200]
        logger.warning("database busy: no connection for %s (%s: %s); %d busy answer(s) since the previous line",
                       where, type(cause).__name__, detail, count)

    def reset(self) -> None:
        with self._lock:
            self._last, self._since = float("-inf"), 0


report = _Reporter()


def retry_after_seconds() -> int:
    return random.randint(RETRY_AFTER_MIN, RETRY_AFTER_MAX)


def _same_site(url: str) -> str:
    """The request's own path and query, unless a browser would read it as another site's address
    (``//host/…``, ``/\\host/…``): the page must not become a redirect to anywhere."""
    return url if url.startswith("/") and url[1:2] not in ("/", "\\") else "/"


def busy_response(request: HttpRequest) -> HttpResponse:
    """503 with ``Retry-After``. Built without the database: a template rendered without a request (so
    no context processors run) and nothing read from or written to the session."""
    seconds = retry_after_seconds()
    if request.get_preferred_type(["text/html", "application/json"]) == "application/json":
        response: HttpResponse = JsonResponse(
            {"detail": "The database is busy. Please retry.", "retry_after": seconds}, status=503)
    else:
        # Only a GET/HEAD repeats by itself: re-sending a form is for the person to decide.
        again = request.method in ("GET", "HEAD")
        html = render_to_string("experiment/busy.html", {
            "retry_after": seconds, "retry_url": _same_site(request.get_full_path()), "auto_retry": again})
        response = HttpResponse(html, status=503)
    response["Retry-After"] = str(seconds)
    response["Cache-Control"] = "no-store"
    # Django logs every 5xx answer as an error line of its own; ``report`` has already said it (throttled).
    response._has_been_logged = True
    return response


class BusyMiddleware(MiddlewareMixin):
    """Turns "no database connection" raised by a view into the busy answer; every other exception goes
    on to Django's usual handling (a 500, logged with its traceback).

    A view's exceptions reach middleware only through ``process_exception`` (each middleware's own
    exceptions become responses where they are raised). Every database access of the participant pages
    and of the admin/cockpit (the session and the user are read lazily, inside the view) happens in the
    view, so this sees them all.
    """

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not connection_unavailable(exception):
            return None
        match = getattr(request, "resolver_match", None)
        report(f"page {match.view_name}" if match and match.view_name else "a page", exception)
        return busy_response(request)
