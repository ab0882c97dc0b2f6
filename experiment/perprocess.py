"""One object per process, for objects that own a thread (threads do not survive a fork: a Celery or
uvicorn worker forked from a parent that already built one must build its own)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerProcess(Generic[T]):
    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._of: tuple[int, T] | None = None

    def get(self) -> T:
        """This process's object, built on first use."""
        with self._lock:
            if self._of is None or self._of[0] != os.getpid():
                self._of = (os.getpid(), self._factory())
            return self._of[1]
