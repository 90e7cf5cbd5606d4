"""The thread policy the CLI applies before torch loads: passive OpenMP waiting and a thread count from the
cores this process may use, each unless the user set it (no timings in tests)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import captioner
from captioner import apply_thread_policy, usable_cores

from helpers import ROOT


@pytest.fixture
def eight_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight CPUs allowed, and no sysfs topology (each CPU counts as a core)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(captioner, "CPU_TOPOLOGY", Path("/nonexistent"))


@pytest.mark.parametrize("cpu_max, expected", [("max 100000\n", 8), ("200000 100000\n", 2), ("150000 100000\n", 2),
                                               ("50000 100000\n", 1), ("1600000 100000\n", 8), ("odd\n", 8),
                                               (None, 8)])
def test_usable_cores_is_the_affinity_cut_to_the_cgroup_quota(tmp_path: Path, eight_cores: None,
                                                              cpu_max: str | None, expected: int) -> None:
    file = tmp_path / "cpu.max"
    if cpu_max is not None:
        file.write_text(cpu_max)
    assert usable_cores(file) == expected


def test_usable_cores_follows_the_affinity_mask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert usable_cores(tmp_path / "none", tmp_path / "none") == 1


def test_hyper_threads_of_one_core_count_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CPUs 0-3 as two cores with two hyper-threads each (0 and 2 share core 0), as sysfs describes them."""
    for cpu, core in enumerate([0, 1, 0, 1]):
        folder = tmp_path / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text("0\n")
        (folder / "core_id").write_text(f"{core}\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert usable_cores(tmp_path / "none", tmp_path) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2})  # taskset to one core's two threads
    assert usable_cores(tmp_path / "none", tmp_path) == 1


def test_policy_sets_passive_waiting_and_the_usable_cores(tmp_path: Path, eight_cores: None,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "cpu.max").write_text("300000 100000\n")
    env: dict[str, str] = {"OMP_NUM_THREADS": " "}  # blank is unset, as OpenMP reads it
    with caplog.at_level(logging.DEBUG, logger="captioner"):
        assert apply_thread_policy(env, tmp_path / "cpu.max") == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "OMP_NUM_THREADS=3 (thread policy)" in caplog.records[0].getMessage()


def test_a_users_settings_override_the_policy(tmp_path: Path, eight_cores: None) -> None:
    env = {"OMP_NUM_THREADS": "5", "OMP_WAIT_POLICY": "ACTIVE"}
    assert apply_thread_policy(env, tmp_path / "none") == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "5"}
    env = {"OMP_WAIT_POLICY": "active"}  # one set, the other chosen
    assert apply_thread_policy(env, tmp_path / "none") == {"OMP_WAIT_POLICY": "active", "OMP_NUM_THREADS": "8"}


# A fresh process, as the CLI starts: the quota file says 1 core where the machine has more, so torch's own
# default (one thread per core) and the policy's count differ; the CLI's policy must reach torch's pool.
SCRIPT = """
import os, sys
from pathlib import Path
import captioner
captioner.CPU_MAX = Path(sys.argv[1])
assert "torch" not in sys.modules
from captioner import cli
try:
    cli.main(["prepare"])  # applies the policy, then fails for want of --data, after importing torch
except SystemExit:
    pass
import torch
print(torch.get_num_threads(), os.environ["OMP_WAIT_POLICY"], os.environ["OMP_NUM_THREADS"])
"""


def run_cli(tmp_path: Path, **env: str) -> list[str]:
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "cpu.max")], capture_output=True, text=True,
                         cwd=ROOT, env={**clean, **env}, check=True)
    return out.stdout.split()


@pytest.mark.slow
@pytest.mark.cli
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to tell the policy's count from torch's")
def test_the_cli_applies_the_policy_before_torch_starts_its_threads(tmp_path: Path) -> None:
    assert run_cli(tmp_path) == ["1", "PASSIVE", "1"]
    assert run_cli(tmp_path, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="ACTIVE") == ["2", "ACTIVE", "2"]

