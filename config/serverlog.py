"""What the ASGI server (uvicorn) writes about clients, kept to what an operator needs.

A text frame that is not valid UTF-8 is the client's fault, and uvicorn already does the right thing with
it: the connection is closed with 1007 ("invalid payload"). But it logs each one at ERROR with a full
traceback, so any client could fill the log (and an alerting rule on ERROR) by sending such frames.
``InvalidFrameLines`` turns that record into one WARNING line without traceback, and writes at most one
per ``every`` seconds and process, with the number of such frames since the previous line.
"""

from __future__ import annotations

import logging
import threading
import time

UVICORN_INVALID_UTF8 = "Invalid UTF-8 sequence received from client."


class InvalidFrameLines(logging.Filter):
    def __init__(self, every: float = 60.0) -> None:
        super().__init__()
        self.every = every
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._since = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != UVICORN_INVALID_UTF8:
            return True
        now = time.monotonic()
        with self._lock:
            self._since += 1
            if now - self._last < self.every:
                return False
            count, self._since, self._last = self._since, 0, now
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "websocket text frame(s) with invalid UTF-8, each connection closed with 1007: %d since the previous line"
        record.args = (count,)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def install() -> None:
    """Attach the filter to uvicorn's logger, where the record is made (a filter on a logger applies only to
    records logged on it). Harmless under any other server: the logger then never logs that message."""
    logging.getLogger("uvicorn.error").addFilter(InvalidFrameLines())
