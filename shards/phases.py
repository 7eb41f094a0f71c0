"""The phases of a ``make shards`` run (scan, resume check, writing, statistics, manifest): which
one it is in, for the interrupt line that says what was kept, and what each cost, for the benchmark
(bench/bench_shards.py)."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from shards.workers import Workers


@dataclass(frozen=True)
class Phase:
    """What one phase cost: wall time, this process's CPU, the workers' CPU (finished tasks)."""

    name: str
    seconds: float
    parent_cpu: float
    worker_cpu: float


class Phases:
    """The phases of a run as they happen (the interrupt line names the current one; bench reads them)."""

    def __init__(self) -> None:
        self.records: list[Phase] = []
        self.current = "start"

    @contextmanager
    def phase(self, name: str, workers: Workers | None = None) -> Iterator[None]:
        """Time the enclosed block as phase ``name``."""
        self.current = name
        wall, cpu, worker_cpu = time.perf_counter(), time.process_time(), workers.cpu if workers else 0.0
        yield
        self.records.append(Phase(name, time.perf_counter() - wall, time.process_time() - cpu,
                                  (workers.cpu if workers else 0.0) - worker_cpu))
