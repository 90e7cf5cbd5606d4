"""Load test of `captioner serve` on loopback: N concurrent clients for a bounded time, with batching on and off.

Starts its own server per setting (API only), so nothing else needs to be running:

    python scripts/load_test.py --clients 1,4,16 --duration 20

Each client posts the example photos in turn (multipart, the model's default decoding options), waiting for each
answer before sending the next. Prints requests/s, latency percentiles, errors and the server's mean batch size.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
                      stop_at: float, latencies: list[float], errors: list[str]) -> None:
    i = start
    while time.perf_counter() < stop_at:
        name, data = photos[i % len(photos)]
        i += 1
        t0 = time.perf_counter()
        try:
            r = await http.post(url, files={"image": (name, data, "image/jpeg")})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors.append(f"{r.status_code}: {r.text[:100]}")
        except httpx.HTTPError as err:
            errors.append(repr(err))


async def run_load(base: str, clients: int, duration: float, photos: list[tuple[str, bytes]]) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        before = (await http.get(base + "/api/health")).json()["batching"]
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(http, base + "/api/caption", photos, c, t0 + duration, latencies, errors)
                               for c in range(clients)))
        elapsed = time.perf_counter() - t0
        after = (await http.get(base + "/api/health")).json()["batching"]
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "requests": len(latencies), "seconds": round(elapsed, 1),
            "rps": round(len(latencies) / elapsed, 2), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "errors": len(errors), "first_error": errors[0] if errors else "",
            "mean_batch": round((after["images"] - before["images"]) / batches, 2) if batches else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per setting")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the batching-on setting")
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
    parser.add_argument("--modes", default="on,off", help="batching on, off, or both")
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
            asyncio.run(run_load(base, 2, 3.0, photos))  # warm-up: first passes allocate
            for clients in (int(c) for c in args.clients.split(",")):
                row = {"batching": mode, **asyncio.run(run_load(base, clients, args.duration, photos))}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.terminate()
            server.wait(30)

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          f"{args.duration:g} s per row, batch wait {args.batch_wait_ms:g} ms, max batch {args.max_batch_size}\n")
    print("| batching | clients | requests/s | p50 ms | p95 ms | p99 ms | errors | mean batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batching']} | {r['clients']} | {r['rps']:.2f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['errors']} | {r['mean_batch']:.2f} |")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
