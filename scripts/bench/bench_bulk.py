"""Benchmark (not a test): bulk captioning of a generated photo library with `captioner caption LIB --output X.jsonl`.

Makes a library of N JPEGs (random crops, resizes and qualities of examples/photos/*.jpg, 500 to a
year/month folder) unless it is already there, then:
1. with --sweep: short runs over the first --sweep-n images of one month folder with other torch
   thread counts, batch sizes, worker threads and torchrun process counts, each --rounds times in turn
   (the machine's speed drifts, and other jobs share it), to choose the options;
2. one run over the whole library, SIGKILLed when the output reaches --kill-at lines, then the same
   command again until it finishes. Reported: images/s of each part; the resident memory (RSS, and its
   peak so far) of the captioning process when the output reaches each of --checkpoints lines and at
   its end, to show that memory stays flat as the library is worked through (the resumed process also
   holds the done set); what the kill cost: the resumed process's start-up until its first new line
   (process start, model, reading the done lines, walking past their files, first batch) against the
   fresh process's; and that the output holds each image exactly once;
3. the parts of a restart that grow with the library, timed in this process on the finished output:
   reading it as the done set, and walking the library.

    python scripts/bench/bench_bulk.py --library /tmp/bulk-library --n 20000 --beam-size 3 --batch-size 16 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
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


def memory_mib(pid: int) -> dict[str, int]:
    """Resident set and its peak so far, in MiB, from /proc (empty once the process has ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return {}
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # a zombie: ended, not yet waited for
        return {}
    return {"rss_mib": int(fields["VmRSS"].split()[0]) // 1024, "peak_mib": int(fields["VmHWM"].split()[0]) // 1024}


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


def watch(cmd: list[str], output: Path, log: Path, threads: int, checkpoints: list[int] = (),
          kill_at: int | None = None, poll: float = 0.2) -> dict:
    """Run cmd with `threads` torch threads, sampling the output's line count and the process's memory;
    SIGKILL it at kill_at lines."""
    before = lines_in(output)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(log, "a") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=err, stderr=err, env=env)
    first_line, first_lines, last = None, 0, {}
    samples, todo = [], sorted(c for c in checkpoints if c > before)
    while proc.poll() is None:
        done = lines_in(output)
        now = time.perf_counter() - start
        if first_line is None and done > before:
            first_line, first_lines = now, done
        if memory := memory_mib(proc.pid):
            last = {"lines": done, "seconds": round(now, 1), **memory}
        while todo and done >= todo[0]:
            samples.append(last)
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
    if kill_at is None and last and samples[-1:] != [last]:
        samples.append(last)  # the last sample before the process ended
    return {"seconds": round(seconds, 1), "first_line_s": first_line and round(first_line, 1), "lines_before": before,
            "lines_after": after, "images_per_s": round((after - before) / seconds, 2),
            # without the start-up: from the first batch written to the end
            # (none under torchrun, whose lines all appear at the merge)
            "images_per_s_running": round((after - first_lines) / (seconds - first_line), 2)
            if first_line and after > first_lines else None,
            "memory": samples}


def restart_costs(library: Path, output: Path, model: str | None) -> dict[str, float]:
    """Seconds to read a finished output as the done set (what a resume does first), and to walk the library
    skipping the done files (hash and look up each path)."""
    from captioner import bulk
    from captioner.pipeline import Captioner

    captioner = Captioner.from_pretrained(model, device="cpu")
    start = time.perf_counter()
    done = bulk.read_done(captioner, output, output, 0, 1)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    walked = skipped = 0
    for key in bulk.walk_library(library):
        walked += 1
        skipped += bulk.path_hash(key) in done
    return {"done_lines": len(done), "read_done_s": round(read_s, 2), "files_walked": walked, "skipped": skipped,
            "walk_and_skip_s": round(time.perf_counter() - start, 2)}


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
    parser.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS) of the process")
    parser.add_argument("--checkpoints", default="2000,10000,15000", help="output lines at which to sample memory")
    parser.add_argument("--kill-at", type=int, default=10000, help="SIGKILL the run at this many lines")
    parser.add_argument("--sweep", action="store_true", help="first time other options on one month folder")
    parser.add_argument("--sweep-n", type=int, default=200, help="images per sweep run")
    parser.add_argument("--rounds", type=int, default=2, help="times each sweep setting runs, in turn")
    parser.add_argument("--no-runs", action="store_true", help="skip step 2 (step 3 reuses its output)")
    args = parser.parse_args()

    make_library(args.library, args.n)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"n": args.n, "beam_size": args.beam_size, "batch_size": args.batch_size, "workers": args.workers,
                    "threads": args.threads}
    log = args.work / "bench.log"

    if args.sweep:
        subset = args.work / "sweep-library"  # links to the first sweep_n images of one folder
        if not subset.exists():
            subset.mkdir()
            for image in sorted((args.library / "2000" / "01").glob("*.jpg"))[:args.sweep_n]:
                (subset / image.name).symlink_to(image)
        other = 3 - args.threads if args.threads in (1, 2) else 1
        runs = [{}, {"threads": other}, {"batch_size": 8}, {"batch_size": 32}, {"workers": 1}, {"nproc": 2}]
        report["sweep"] = []
        for options in runs * args.rounds:
            out = args.work / "sweep.jsonl"
            out.unlink(missing_ok=True)
            options = dict(options)
            threads = options.pop("threads", args.threads)
            result = watch(command(subset, out, args, **options), out, log, threads)
            del result["memory"]  # under torchrun it would be the launcher's
            report["sweep"].append({"options": {**options, "threads": threads}, **result})
            print(json.dumps(report["sweep"][-1]), flush=True)

    output = args.work / "captions.jsonl"
    if not args.no_runs:
        checkpoints = [int(c) for c in args.checkpoints.split(",") if int(c) <= args.n]
        output.unlink(missing_ok=True)
        cmd = command(args.library, output, args)
        report["command"] = " ".join(cmd)
        report["killed"] = watch(cmd, output, log, args.threads, checkpoints, kill_at=args.kill_at)
        print(json.dumps(report["killed"]), flush=True)
        report["resumed"] = watch(cmd, output, log, args.threads, checkpoints)
        print(json.dumps(report["resumed"]), flush=True)
        check_exactly_once(output, args.n)
        report["exactly_once"] = True
    if lines_in(output) == args.n:
        report["restart_costs"] = restart_costs(args.library, output, args.model)
        print(json.dumps(report["restart_costs"]), flush=True)
    (args.work / "report.json").write_text(json.dumps(report, indent=1))
    print(f"report: {args.work / 'report.json'}")


if __name__ == "__main__":
    main()
