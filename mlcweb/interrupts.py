"""Ctrl-C that always ends the work, even where a library swallows it.

TVM's dlight rules try schedule steps inside bare ``except:`` clauses, so a ``KeyboardInterrupt`` raised
while one runs is caught and forgotten, and a build would go on to replace its output. :class:`Interrupts`
records every SIGINT as well as raising it; :meth:`Interrupts.check` raises again at the next stage
boundary if the first one was swallowed. Where a library turns the interrupt into another error (torch's
export re-raises it as an ``UnboundLocalError`` when it lands inside its dispatch), leaving the context
raises ``KeyboardInterrupt`` from that error instead.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["Interrupts"]


class Interrupts:
    """Context manager: while active (in the main thread), SIGINT sets :attr:`seen` and raises."""

    def __init__(self) -> None:
        self.seen = threading.Event()
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.seen.set()
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if an interrupt came since entering (and was swallowed)."""
        if self.seen.is_set():
            raise KeyboardInterrupt

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
        if value is not None and self.seen.is_set() and not isinstance(value, KeyboardInterrupt):
            raise KeyboardInterrupt from value
