"""How many CPU threads torch uses: a default that does not oversubscribe a busy machine.

torch's own default is one intra-op thread per logical core. That is fast on
an idle machine and a trap on a busy one: OpenMP threads that outnumber the
free cores wait for each other at every parallel region while the scheduler
runs someone else, and a step can take ten times longer (measured on a
shared 2-core machine: ``benchmarks/threads.py``, numbers in
``benchmarks/README.md``). :func:`default_threads` is what every ``steerlab``
command uses unless ``--threads N`` says otherwise:

1. ``OMP_NUM_THREADS`` when it is set (the user, or a scheduler, decided);
2. otherwise ``min(physical cores, 4, free cores)``, at least 1, where the
   physical cores are those this process may run on (CPU affinity and a
   cgroup CPU quota respected) and the free cores are those minus the
   machine's one-minute load average (the work already running).

Four is the cap because a CPU step of the models steerlab targets gains
little past it while a fifth thread is one more to wait for. Python callers
keep torch's default unless they call :func:`set_threads` themselves.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from steerlab.interventions.errors import ConfigError

__all__ = ["default_threads", "set_threads", "physical_cores", "CAP"]

#: the most threads the default picks
CAP = 4


def _usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def _cgroup_quota() -> int | None:
    """CPUs a cgroup v2 quota allows (``cpu.max``: quota period), or ``None`` without a quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads of one core count once)."""
    cpus = _usable_cpus()
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(), topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("?", str(c)))  # no topology: count logical CPUs
    n = len(cores) or 1
    quota = _cgroup_quota()
    return min(n, quota) if quota is not None else n


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def default_threads() -> int:
    """The thread count the ``steerlab`` commands use by default (see the module docstring)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = physical_cores()
    free = math.floor(cores - _load() + 0.5)
    return max(1, min(cores, CAP, free))


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to ``n`` (default: :func:`default_threads`); returns the count set."""
    if n is None:
        n = default_threads()
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"threads={n!r}: expected a positive number of threads")
    torch.set_num_threads(n)
    return n
