"""Benchmark (not a test): bulk captioning of a generated photo library with `captioner caption LIB --output X.jsonl`.

Makes a library of N JPEGs (random crops, resizes and qualities of examples/photos/*.jpg, in year/month
folders) unless it is already there, then:
1. one uninterrupted run: images/s, and the process's resident memory (RSS, and its peak so far) when
   the output reaches each of --checkpoints lines, to show that memory stays flat as the library grows;
2. the same run killed with SIGKILL when the output reaches --kill-at lines, then resumed: the time lost
   to the kill (killed + resumed wall time minus the uninterrupted run's), and the restart's own cost
   (resumed process start to its first new line, against the uninterrupted run's start to its first line);
3. with --sweep: short runs over one month folder (500 images) with other batch sizes, worker threads,
   beam sizes and torchrun process counts, each --rounds times in turn (the machine's speed drifts), to
   choose the options.

    python scripts/bench_bulk.py --library /tmp/bulk-library --n 20000 --beam-size 3 --batch-size 16
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PER_FOLDER = 500


def make_library(folder: Path, n: int, seed: int = 0) -> None:
    """n JPEGs from random crops (30-100% of each side) of the example photos, resized so the long side
    is 200-800 px, saved at quality 70-95; PER_FOLDER to a folder, nested year/month."""
    if folder.exists() and sum(1 for _ in folder.rglob("*.jpg")) == n:
        return
    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted((ROOT / "examples" / "photos").glob("*.jpg"))]
    start = time.perf_counter()
    for i in range(n):
        photo = rng.choice(photos)
        w, h = (max(16, int(side * rng.uniform(0.3, 1.0))) for side in photo.size)
        left, top = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        scale = rng.uniform(200, 800) / max(w, h)
        image = photo.crop((left, top, left + w, top + h)).resize((max(1, round(w * scale)), max(1, round(h * scale))))
        k = i // PER_FOLDER
        path = folder / f"{2000 + k // 12}" / f"{k % 12 + 1:02d}" / f"IMG_{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=rng.randint(70, 95))
    print(f"made {n} images in {folder} in {time.perf_counter() - start:.0f} s", flush=True)


def lines_in(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def memory_mib(pid: int) -> tuple[float, float]:
    """(resident set, its peak so far) of a process, in MiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def command(library: Path, output: Path, args: argparse.Namespace, nproc: int = 1, **options: int) -> list[str]:
    opts = {"beam_size": args.beam_size, "batch_size": args.batch_size, "workers": args.workers} | options
    launcher = [sys.executable, "-m", "captioner.cli"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", free_port(), "-m", "captioner.cli"]
    cmd = launcher + ["caption", str(library), "--output", str(output), "--device", "cpu"]
    for name, value in opts.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd + (["--model", args.model] if args.model else [])


def watch(cmd: list[str], output: Path, log: Path, checkpoints: list[int] = (), kill_at: int | None = None,
          poll: float = 0.2) -> dict:
    """Run cmd, sampling the output's line count and the process's memory; SIGKILL it at kill_at lines."""
    before = lines_in(output)
    start = time.perf_counter()
    with open(log, "a") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=err, stderr=err)
    first_line = None
    samples, todo = [], sorted(checkpoints)
    while proc.poll() is None:
        done = lines_in(output)
        now = time.perf_counter() - start
        if first_line is None and done > before:
            first_line = now
        while todo and done >= todo[0]:
            rss, peak = memory_mib(proc.pid)
            samples.append({"lines": done, "seconds": round(now, 1), "rss_mib": round(rss), "peak_mib": round(peak)})
            todo.pop(0)
        if kill_at is not None and done >= kill_at:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        time.sleep(poll)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    after = lines_in(output)
    return {"seconds": round(seconds, 1), "first_line_s": first_line and round(first_line, 1), "lines_before": before,
            "lines_after": after, "images_per_s": round((after - before) / seconds, 2), "memory": samples}


def check_exactly_once(output: Path, n: int) -> None:
    files = [json.loads(line)["file"] for line in output.read_text().splitlines()]
    if len(files) != n or len(set(files)) != n:
        raise SystemExit(f"{output}: {len(files)} lines, {len(set(files))} distinct files, expected {n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, default=Path("/tmp/bulk-library"))
    parser.add_argument("--n", type=int, default=20000, help="images in the library")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bulk-bench"), help="folder for outputs and logs")
    parser.add_argument("--model", help="model folder (default: the shipped model)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--checkpoints", default="2000,10000,20000", help="output lines at which to sample memory")
    parser.add_argument("--kill-at", type=int, default=10000, help="SIGKILL the second run at this many lines")
    parser.add_argument("--sweep", action="store_true", help="also time other options on the first year folder")
    parser.add_argument("--rounds", type=int, default=2, help="times each sweep setting runs, in turn")
    parser.add_argument("--skip-full", action="store_true", help="only the sweep")
    args = parser.parse_args()

    make_library(args.library, args.n)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"n": args.n, "beam_size": args.beam_size, "batch_size": args.batch_size, "workers": args.workers}
    log = args.work / "bench.log"

    if args.sweep:
        subset = args.library / "2000" / "01"
        runs = [dict(), dict(batch_size=8), dict(batch_size=32), dict(workers=1), dict(beam_size=5), dict(nproc=2)]
        report["sweep"] = []
        for options in runs * args.rounds:
            out = args.work / "sweep.jsonl"
            out.unlink(missing_ok=True)
            result = watch(command(subset, out, args, **options), out, log)
            report["sweep"].append({"options": options or "defaults", **result})
            print(json.dumps(report["sweep"][-1]), flush=True)

    if not args.skip_full:
        checkpoints = [int(c) for c in args.checkpoints.split(",") if int(c) <= args.n]
        full, resumed = args.work / "full.jsonl", args.work / "resumed.jsonl"
        full.unlink(missing_ok=True)
        resumed.unlink(missing_ok=True)
        report["full"] = watch(command(args.library, full, args), full, log, checkpoints)
        print(json.dumps(report["full"]), flush=True)
        check_exactly_once(full, args.n)
        report["killed"] = watch(command(args.library, resumed, args), resumed, log, kill_at=args.kill_at)
        report["resume"] = watch(command(args.library, resumed, args), resumed, log)
        check_exactly_once(resumed, args.n)
        report["time_lost_s"] = round(report["killed"]["seconds"] + report["resume"]["seconds"]
                                      - report["full"]["seconds"], 1)
        print(json.dumps({k: report[k] for k in ("killed", "resume", "time_lost_s")}), flush=True)
    (args.work / "report.json").write_text(json.dumps(report, indent=1))
    print(f"report: {args.work / 'report.json'}")


if __name__ == "__main__":
    main()
