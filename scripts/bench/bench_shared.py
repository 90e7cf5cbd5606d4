"""Two captioner jobs on one machine: each kind of job alone, and beside a second identical one started at the
same moment, under the thread policy the CLI applies (captioner/__init__.py) and under torch's own defaults
(OpenMP threads that spin while they wait, one per core), measured in one run.

    python scripts/bench/bench_shared.py --photos ../shared/data/coco-dev/images --limit 60
    python scripts/bench/bench_shared.py --jobs caption,train,serve --prepared prepared/quickstart
    python scripts/bench/bench_shared.py --jobs caption,train --alone 7

The jobs: `caption` captions the photos (process start included); `train` runs one epoch of
configs/quickstart.yaml on its prepared folder (`make quickstart` makes it; process start and the dev
scoring included); `serve` starts `captioner serve` and times its answers to the photos posted one after
another to /api/caption (the server's start left out). Run nothing else heavy beside it. Prints one
Markdown row per job and setting: seconds alone (best of 2), seconds of each of the two shared jobs, and the
slowdown.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DEFAULTS = "torch's defaults (active waiting, 2 threads)"
SETTINGS = {
    "thread policy (passive waiting, one thread per usable core)": {},
    DEFAULTS: {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"},
}
CLI = [sys.executable, "-m", "captioner.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_job(folder: Path) -> None:
    """Start a server, post every photo of `folder` once, print the seconds the answers took."""
    port = free_port()
    server = subprocess.Popen([*CLI, "serve", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{base}/api/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise SystemExit("the server did not start within 2 minutes")
        start = time.perf_counter()
        for photo in sorted(folder.iterdir()):
            request = urllib.request.Request(f"{base}/api/caption", data=photo.read_bytes(),
                                             headers={"Content-Type": "image/jpeg"})
            json.load(urllib.request.urlopen(request, timeout=300))
        print(time.perf_counter() - start)
    finally:
        server.terminate()
        server.wait()


def command(kind: str, folder: Path, work: Path, prepared: str) -> list[str]:
    if kind == "caption":
        return [*CLI, "caption", str(folder)]
    if kind == "train":
        return [*CLI, "train", "--config", "configs/quickstart.yaml", "--prepared", prepared, "--epochs", "1",
                "--run-dir", str(work / f"run-{time.monotonic_ns()}")]
    return [sys.executable, __file__, "--serve-job", str(folder)]


def timed(kind: str, folder: Path, work: Path, prepared: str, env: dict[str, str], together: int) -> list[float]:
    """Seconds each of `together` identical jobs took, started at once (serve: its answers' time)."""
    start = time.perf_counter()
    procs = [subprocess.Popen(command(kind, folder, work, prepared), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(together)]
    seconds = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{kind} job failed (exit {p.returncode})")
        seconds.append(float(out.split()[-1]) if kind == "serve" else time.perf_counter() - start)
    return seconds


def alone_only(args: argparse.Namespace, folder: Path, work: Path, envs: dict[str, dict[str, str]]) -> None:
    """Each job alone, args.alone times per setting, the settings interleaved so that drift hits both alike."""
    print("| job | setting | alone (s): median | min - max | speed vs torch's defaults |")
    print("| --- | --- | ---: | ---: | ---: |")
    for kind in args.jobs.split(","):
        runs: dict[str, list[float]] = {name: [] for name in envs}
        timed(kind, folder, work, args.prepared, next(iter(envs.values())), 1)  # warm the file cache
        for _ in range(args.alone):
            for name, env in envs.items():
                runs[name].append(timed(kind, folder, work, args.prepared, env, 1)[0])
        defaults = statistics.median(runs[DEFAULTS])
        for name, seconds in runs.items():
            median = statistics.median(seconds)
            print(f"| {kind} | {name} | {median:.2f} | {min(seconds):.2f} - {max(seconds):.2f} | "
                  f"{defaults / median:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", default="../shared/data/coco-dev/images")
    parser.add_argument("--limit", type=int, default=60, help="photos captioned by each caption or serve job")
    parser.add_argument("--jobs", default="caption", help="comma-separated: caption, train, serve")
    parser.add_argument("--prepared", default="prepared/quickstart", help="the train job's prepared folder")
    parser.add_argument("--spin", type=int, nargs="+", metavar="COUNT", help="also time the policy with a short "
                        "spin before sleeping, libgomp's GOMP_SPINCOUNT (BENCHMARKS tried 20000)")
    parser.add_argument("--alone", type=int, metavar="N", help="instead: each job alone only, N times under each "
                        "setting, the settings taking turns; the median and the spread of each, and their ratio")
    parser.add_argument("--serve-job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_job:
        serve_job(Path(args.serve_job))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder, work = Path(tmp) / "photos", Path(tmp) / "runs"
        folder.mkdir()
        for photo in sorted(Path(args.photos).iterdir())[: args.limit]:
            shutil.copy(photo, folder / photo.name)
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else ""
        print(f"{cpu}, {os.cpu_count()} cores, float32 (train: the precision its timing chooses); "
              f"{args.limit} photos a caption or serve job")
        settings = SETTINGS | {f"the policy with a short spin (GOMP_SPINCOUNT={n})": {"GOMP_SPINCOUNT": str(n)}
                               for n in args.spin or ()}
        envs = {name: {k: v for k, v in os.environ.items()
                       if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")} | extra
                for name, extra in settings.items()}
        if args.alone:
            alone_only(args, folder, work, envs)
            return
        print("| job | setting | alone (s) | beside a second job (s, each) | slowdown |")
        print("| --- | --- | ---: | ---: | ---: |")
        for kind in args.jobs.split(","):
            for name, env in envs.items():
                timed(kind, folder, work, args.prepared, env, 1)  # warm the file cache
                alone = min(timed(kind, folder, work, args.prepared, env, 1)[0] for _ in range(2))
                shared = timed(kind, folder, work, args.prepared, env, 2)
                print(f"| {kind} | {name} | {alone:.1f} | {shared[0]:.1f}, {shared[1]:.1f} | "
                      f"{max(shared) / alone:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
