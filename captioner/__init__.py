"""captioner: neural image captioning on EfficientNet-Lite features (Show, Attend and Tell or a transformer decoder)."""
from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# cgroup v2's CPU quota of this process's group: "QUOTA PERIOD" (microseconds), or "max PERIOD" for none
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CPU_TOPOLOGY = Path("/sys/devices/system/cpu")  # cpuN/topology/{physical_package_id,core_id}

if TYPE_CHECKING:
    from .config import Config as Config  # re-exported: `captioner.Config`, loaded lazily below
    from .pipeline import Captioner as Captioner


def __getattr__(name: str) -> Any:
    """Import torch-heavy parts on first use, so `captioner --help` starts fast."""
    if name == "Captioner":
        from .pipeline import Captioner
        return Captioner
    if name == "Config":
        from .config import Config
        return Config
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")


# The thread policy lives here, not in runtime.py, because it must run before torch is imported: OpenMP reads
# OMP_WAIT_POLICY once, when torch loads it, and runtime.py imports torch.

def usable_cores(cpu_max: Path | None = None, topology: Path | None = None) -> int:
    """The cores this process may use: the physical cores of its CPU affinity (taskset, a job scheduler; two
    hyper-threads of one core count once, as in torch's own default), cut to the cgroup CPU quota (a container's
    --cpus), rounded up; at least 1. torch's default counts the machine's cores, which is what started 2
    spinning threads in each of two processes sharing 2 cores."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not on Linux
        cpus = set(range(os.cpu_count() or 1))
    cores = _physical_cores(cpus, topology or CPU_TOPOLOGY)
    try:
        quota, period = (cpu_max or CPU_MAX).read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2, or a file of another form
        pass
    return max(1, cores)


def _physical_cores(cpus: set[int], topology: Path) -> int:
    """Distinct (package, core) pairs among `cpus` in sysfs; the CPU count where sysfs does not say."""
    cores = set()
    for cpu in cpus:
        folder = topology / f"cpu{cpu}" / "topology"
        try:
            cores.add(((folder / "physical_package_id").read_text().strip(), (folder / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def apply_thread_policy(environ: MutableMapping[str, str] | None = None, cpu_max: Path | None = None,
                        topology: Path | None = None) -> dict[str, str]:
    """Passive OpenMP waiting and one thread per usable core, for a process whose torch is not imported yet
    (the CLI calls this first). Spinning waiters cost a 16x slow-down when two captioner jobs share 2 cores
    (issue 36: 32.3 s against 1.95 s alone); passive waiting brought that to 2.7 s. A variable the user set
    is left as it is, the override (a blank one, which OpenMP rejects, counts as unset). Returns the values
    now in effect, logged at debug level only, so the commands' output stays the same."""
    env = os.environ if environ is None else environ
    chosen = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(usable_cores(cpu_max, topology))}
    source = {}
    for name, value in chosen.items():
        if env.get(name, "").strip():
            source[name] = "set by the user"
        else:
            env[name] = value
            source[name] = "thread policy"
    if environ is None and "torch" in sys.modules and source["OMP_NUM_THREADS"] == "thread policy":
        sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))  # imported early: its count at least
    logging.getLogger("captioner").debug(
        "threads: %s", ", ".join(f"{name}={env[name]} ({source[name]})" for name in chosen))
    return {name: env[name] for name in chosen}
