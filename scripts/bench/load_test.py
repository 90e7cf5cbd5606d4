"""Load test of `captioner serve` on loopback: N concurrent clients for a bounded time, with batching on and off.

Starts its own server per setting (API only), so nothing else needs to be running:

    python scripts/bench/load_test.py --clients 1,4,16 --duration 20

Each client posts the example photos in turn (multipart, the model's default decoding options), waiting for each
answer before sending the next. Prints requests/s, latency percentiles, errors, the server's mean batch size and
its resident memory after each row. `--bad-every 4` makes every 4th request a bad one (truncated JPEG, text, a
decompression bomb's header, in turn): those must get a 4xx, and the others must still succeed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bad_inputs(photo: bytes) -> list[tuple[str, bytes]]:
    """Files the server must refuse with a 4xx without harm to the other requests."""
    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return [("truncated.jpg", photo[: len(photo) // 3]), ("notes.jpg", b"not an image " * 100), ("bomb.png", bomb)]


def server_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def start_server(port: int, max_batch_size: int, wait_ms: float, model: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "captioner.cli", "serve", "--port", str(port), "--no-ui", "--log-level", "warning",
           "--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(wait_ms)]
    server = subprocess.Popen(cmd + (["--model", model] if model else []), cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("server did not start within 120 s")


async def client_loop(http: httpx.AsyncClient, url: str, photos: list[tuple[str, bytes]], start: int,
                      stop_at: float, bad_every: int, latencies: list[float], errors: list[str],
                      rejected: list[int]) -> None:
    bad = bad_inputs(photos[0][1])
    i = start
    while time.perf_counter() < stop_at:
        i += 1
        is_bad = bad_every > 0 and i % bad_every == 0
        name, data = bad[i % len(bad)] if is_bad else photos[i % len(photos)]
        t0 = time.perf_counter()
        try:
            r = await http.post(url, files={"image": (name, data, "image/jpeg")})
        except httpx.HTTPError as err:
            errors.append(repr(err))
            continue
        if is_bad and 400 <= r.status_code < 500:
            rejected.append(r.status_code)
        elif not is_bad and r.status_code == 200:
            latencies.append(time.perf_counter() - t0)
        else:
            errors.append(f"{name}: {r.status_code}: {r.text[:100]}")


async def sample_rss(pid: int, stop_at: float, samples: list[float], every: float = 2.0) -> None:
    while time.perf_counter() < stop_at:
        samples.append(round(server_rss_mib(pid), 1))
        await asyncio.sleep(every)
    samples.append(round(server_rss_mib(pid), 1))


async def run_load(base: str, clients: int, duration: float, photos: list[tuple[str, bytes]],
                   bad_every: int, server_pid: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    rejected: list[int] = []
    rss: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        before = (await http.get(base + "/api/health")).json()["batching"]
        t0 = time.perf_counter()
        await asyncio.gather(sample_rss(server_pid, t0 + duration, rss),
                             *(client_loop(http, base + "/api/caption", photos, c, t0 + duration, bad_every,
                                           latencies, errors, rejected) for c in range(clients)))
        elapsed = time.perf_counter() - t0
        after = (await http.get(base + "/api/health")).json()["batching"]
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "requests": len(latencies), "seconds": round(elapsed, 1),
            "rps": round(len(latencies) / elapsed, 2), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "errors": len(errors), "first_error": errors[0] if errors else "", "rejected_bad": len(rejected),
            "mean_batch": round((after["images"] - before["images"]) / batches, 2) if batches else 0.0,
            "server_rss_mib": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per setting")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the batching-on setting")
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
    parser.add_argument("--modes", default="on,off", help="batching on, off, or both")
    parser.add_argument("--bad-every", type=int, default=0, help="every Nth request sends a bad file (0: none)")
    parser.add_argument("--model", help="model folder (default: the shipped one)")
    parser.add_argument("--photos", default=str(ROOT / "examples" / "photos"))
    parser.add_argument("--output", help="also write the rows as JSON here")
    args = parser.parse_args()

    photos = [(p.name, p.read_bytes()) for p in sorted(Path(args.photos).glob("*.jpg"))]
    if not photos:
        raise SystemExit(f"no .jpg photos in {args.photos}")
    rows = []
    for mode in args.modes.split(","):
        port = free_port()
        server = start_server(port, args.max_batch_size if mode == "on" else 1, args.batch_wait_ms, args.model)
        try:
            base = f"http://127.0.0.1:{port}"
            asyncio.run(run_load(base, 2, 3.0, photos, args.bad_every, server.pid))  # warm-up: first passes allocate
            for clients in (int(c) for c in args.clients.split(",")):
                load = run_load(base, clients, args.duration, photos, args.bad_every, server.pid)
                row = {"batching": mode, **asyncio.run(load)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.terminate()
            server.wait(30)

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          f"{args.duration:g} s per row, batch wait {args.batch_wait_ms:g} ms, max batch {args.max_batch_size}\n")
    print("| batching | clients | requests/s | p50 ms | p95 ms | p99 ms | errors | bad files refused | mean batch "
          "| server RSS MiB: start, peak, end |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rss = r["server_rss_mib"]
        print(f"| {r['batching']} | {r['clients']} | {r['rps']:.2f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['errors']} | {r['rejected_bad']} | {r['mean_batch']:.2f} "
              f"| {rss[0]:.0f}, {max(rss):.0f}, {rss[-1]:.0f} |")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
