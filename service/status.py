"""What the loop tells the HTTP thread: a small dict behind a lock, and the heartbeat.

The loop ``update``s fields when they change (per log interval, evaluation, checkpoint) and
``beat``s after every step and evaluation batch; the HTTP thread reads a copy for ``/status``
and judges ``/healthz`` from the heartbeat's age.  Nothing here blocks the loop for longer
than a dict update.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class StatusBoard:
    """Shared, thread-safe run status and heartbeat."""

    def __init__(self, stall_seconds: float, **fields: Any) -> None:
        self.stall_seconds = stall_seconds
        self._lock = threading.Lock()
        self._fields: dict[str, Any] = {"phase": "starting", **fields}
        self._beat_monotonic = time.monotonic()
        self.last_beat = time.time()  # unix time: the heartbeat metric reads it (ServiceMetrics.follow)

    def update(self, **fields: Any) -> None:
        with self._lock:
            self._fields.update(fields)

    def beat(self, phase: str | None = None) -> float:
        """The loop is alive (optionally: now in ``phase``); returns the unix time."""
        # The metric's time first, then the age's clock (float stores, atomic under the GIL): a
        # scrape between the two sees the metric no older than the beat /status judges by.
        self.last_beat = time.time()
        self._beat_monotonic = time.monotonic()
        if phase is not None and self._fields.get("phase") != phase:
            self.update(phase=phase)
        return self.last_beat

    @contextmanager
    def kept_alive(self, phase: str) -> Iterator[None]:
        """Beat from a thread of its own while the block waits on another process's work that beats
        for itself (a rank waiting in a collective for a peer's shard check before training).  That
        peer's /healthz judges the work, so a hang there still turns the job unhealthy; here the wait
        alone would have (minutes on ImageNet, past ``stall_seconds``)."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(min(1.0, self.stall_seconds / 4)):
                self.beat(phase)

        self.beat(phase)
        keeper = threading.Thread(target=beat, name="status-kept-alive", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            done.set()
            keeper.join()

    def heartbeat_age(self) -> float:
        return time.monotonic() - self._beat_monotonic

    def snapshot(self) -> dict[str, Any]:
        """A copy of the fields plus the heartbeat's age, for ``/status``."""
        with self._lock:
            fields = dict(self._fields)
        fields["heartbeat_age_seconds"] = round(self.heartbeat_age(), 3)
        return fields

    def health(self) -> tuple[bool, str]:
        """(healthy, reason): unhealthy once the heartbeat is older than ``stall_seconds``."""
        age = self.heartbeat_age()
        phase = self._fields.get("phase")
        if age > self.stall_seconds:
            return False, (f"stalled: no heartbeat for {age:.0f} s (limit {self.stall_seconds:g} s), "
                           f"phase {phase}, step {self._fields.get('step')}")
        return True, f"ok: heartbeat {age:.1f} s ago, phase {phase}"
