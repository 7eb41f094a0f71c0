"""Step timing in the spirit of torchvision's ``MetricLogger``: data wait apart from compute.

Per step we only take host timestamps (no GPU sync): the time spent waiting for the next
batch, and the time from having it to asking for the next one.  At each log interval the
caller synchronises the device once, so the window's wall time and images/s are honest;
within a window, "compute" is the host's view (kernel launches can run ahead of it), which is
why it is reported next to the window's synchronised wall time, not instead of it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Window:
    """One log interval."""

    steps: int
    images: int
    seconds: float
    data_seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_share(self) -> float:
        """Share of the window spent waiting for data (0..1)."""
        return self.data_seconds / self.seconds if self.seconds > 0 else 0.0


class StepTimer:
    """Wrap a batch iterator; ``window(sync)`` closes a log interval after one device sync."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._data = 0.0
        self._steps = 0
        self._images = 0
        self.last_wait = 0.0  # seconds the latest ``next`` blocked (per-step data-wait metric)

    def iterate(self, batches: Iterable[T], batch_size: Callable[[T], int]) -> Iterator[T]:
        """Yield from ``batches``, timing how long each ``next`` blocks."""
        it = iter(batches)
        while True:
            waited = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.last_wait = time.perf_counter() - waited
            self._data += self.last_wait
            self._steps += 1
            self._images += batch_size(batch)
            yield batch

    def window(self, sync: Callable[[], None]) -> Window:
        """Synchronise, then return and reset the current interval's numbers."""
        sync()
        now = time.perf_counter()
        result = Window(self._steps, self._images, now - self._start, self._data)
        self._start, self._data, self._steps, self._images = now, 0.0, 0, 0
        return result
