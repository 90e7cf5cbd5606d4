"""Two captioner jobs on one machine: `captioner caption` over a folder alone, and beside a second one
started at the same moment, under the thread policy the CLI applies (captioner/__init__.py) and under
torch's own defaults (OpenMP threads that spin while they wait, one per core), measured in one run.

    python scripts/bench/bench_shared.py --photos ../shared/data/coco-dev/images --limit 60

Run nothing else heavy beside it. Prints one Markdown row per setting: seconds alone, seconds of each of the
two shared jobs, and the slowdown.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "thread policy (passive waiting, one thread per usable core)": {},
    "torch's defaults (active waiting, 2 threads)": {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"},
}


def job(folder: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "captioner.cli", "caption", str(folder)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def timed(folder: Path, env: dict[str, str], together: int) -> list[float]:
    """Seconds each of `together` identical jobs took, started at once."""
    start = time.perf_counter()
    procs = [job(folder, env) for _ in range(together)]
    ends = []
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"captioner caption failed (exit {p.returncode})")
        ends.append(time.perf_counter() - start)
    return ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", required=True)
    parser.add_argument("--limit", type=int, default=60, help="photos captioned by each job")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for photo in sorted(Path(args.photos).iterdir())[: args.limit]:
            shutil.copy(photo, folder / photo.name)
        print(f"{platform.machine()}, {os.cpu_count()} cores, float32; {args.limit} photos a job")
        print("| setting | alone (s) | beside a second job (s, each) | slowdown |")
        print("| --- | ---: | ---: | ---: |")
        for name, extra in SETTINGS.items():
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")} | extra
            timed(folder, env, 1)  # warm the file cache
            alone = min(timed(folder, env, 1)[0] for _ in range(2))
            shared = timed(folder, env, 2)
            print(f"| {name} | {alone:.1f} | {shared[0]:.1f}, {shared[1]:.1f} | {max(shared) / alone:.1f}x |")


if __name__ == "__main__":
    main()
