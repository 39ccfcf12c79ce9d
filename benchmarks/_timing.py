"""A robust in-process timer for the benchmarks: warmup, interleaved repeats, medians, a table of ratios.

Every case of one comparison is timed in the same process, round-robin
(case A, case B, case C, A, B, C, ...), so a slow spell of a shared machine
lands on every case alike; each case's figure is the median over rounds of
the mean time per call within a round. On a GPU each measurement is bracketed
by ``torch.cuda.synchronize`` so queued kernels are counted.

Ratios are what the benchmarks report (ours ÷ the floor), never raw times
alone: raw times depend on the machine, ratios measured in one process
mostly do not.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Bench", "Row", "print_table", "import_time", "sync", "count_ops", "record", "JSON_ENV"]

#: when set, every printed table is also appended to this JSON-lines file (``gpu.sh`` collects them)
JSON_ENV = "STEERLAB_BENCH_JSON"


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels on ``device`` (a no-op on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


@dataclass
class Bench:
    """Times named callables against each other.

    ``min_round_s`` sets how long one round of one case lasts at least (the
    callable is repeated ``number`` times per round, ``number`` chosen in the
    warmup so a round takes about that long); ``rounds`` rounds are run,
    interleaved across cases.
    """

    device: torch.device | str = "cpu"
    rounds: int = 9
    warmup: int = 2
    min_round_s: float = 0.2
    cases: dict[str, Callable[[], object]] = field(default_factory=dict)

    def add(self, name: str, fn: Callable[[], object]) -> None:
        self.cases[name] = fn

    def _once(self, fn: Callable[[], object], number: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync(self.device)
        return (time.perf_counter() - t0) / number

    def run(self) -> dict[str, float]:
        """Median seconds per call, by case name."""
        numbers: dict[str, int] = {}
        for name, fn in self.cases.items():
            for _ in range(self.warmup):
                fn()
            t = self._once(fn, 1)
            numbers[name] = max(1, int(self.min_round_s / max(t, 1e-7)))
        samples: dict[str, list[float]] = {name: [] for name in self.cases}
        gc_was = gc.isenabled()
        gc.collect()
        gc.disable()  # a collection landing in one case's round is noise
        try:
            for _ in range(self.rounds):
                for name, fn in self.cases.items():
                    samples[name].append(self._once(fn, numbers[name]))
                gc.collect()
        finally:
            if gc_was:
                gc.enable()
        return {name: statistics.median(s) for name, s in samples.items()}


@dataclass
class Row:
    """One line of a result table: ``ours ÷ floor`` with an optional target."""

    label: str
    ours: float
    floor: float
    target: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.floor


def _ms(s: float) -> str:
    return f"{s * 1e3:9.3f}"


def record(title: str, rows: list[dict], **meta) -> None:
    """Append one table (``rows``: plain JSON data) to the file :data:`JSON_ENV` names, if any."""
    path = os.environ.get(JSON_ENV)
    if not path:
        return
    entry = {"script": Path(sys.argv[0]).name, "title": title, "rows": rows, **meta}
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def print_table(title: str, rows: list[Row]) -> None:
    """Print ``rows`` as a fixed-width table (times in ms); also :func:`record` it."""
    record(title, [{"measure": r.label, "ours_ms": r.ours * 1e3, "floor_ms": r.floor * 1e3, "ratio": r.ratio,
                    "target": r.target, "note": r.note} for r in rows])
    w = max([len(r.label) for r in rows] + [10])
    print(f"\n== {title}")
    print(f"{'measure':<{w}}  {'ours ms':>9}  {'floor ms':>9}  {'ratio':>7}  {'target':>7}  note")
    for r in rows:
        tgt = f"<={r.target:.2f}" if r.target is not None else ""
        print(f"{r.label:<{w}}  {_ms(r.ours)}  {_ms(r.floor)}  {r.ratio:7.3f}  {tgt:>7}  {r.note}")
    sys.stdout.flush()


def import_time(statements: dict[str, str], *, rounds: int = 7) -> dict[str, float]:
    """Median wall time of ``python -c <statement>`` per name (fresh interpreters, interleaved)."""
    samples: dict[str, list[float]] = {k: [] for k in statements}
    for _ in range(rounds):
        for name, stmt in statements.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", stmt], check=True)
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def count_ops(fn: Callable[[], object]) -> int:
    """How many ATen operators one call of ``fn`` dispatches: a load-independent measure of
    per-call work (on a GPU, roughly the kernel launches)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.n += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return _Count.n
