"""The one worker that owns the model: requests from the API and the page that arrive within a few
milliseconds of each other share one encoder and decoder pass."""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from ..decoding import Caption
from ..decoding_options import DecodingOptions
from ..pipeline import Captioner

MAX_BATCH_SIZE = 16
BATCH_WAIT_MS = 20.0  # long enough for a client's next request to make the batch (docs/BENCHMARKS.md)
MAX_QUEUE = 256


class Busy(RuntimeError):
    """The batcher's queue is full: the server answers 503 rather than letting latency and memory grow."""


class Closed(RuntimeError):
    """The batcher has been closed (the server is shutting down): new work is refused, never left waiting."""


@dataclass
class Result:
    """One image's n-best captions and what its batch cost."""

    captions: list[Caption]
    concepts: list[tuple[str, float]]
    neighbours: list[tuple[str, float]]
    batch_size: int
    queue_ms: float
    model_ms: float


@dataclass
class _Job:
    pixels: torch.Tensor
    opts: DecodingOptions
    future: Future
    queued: float


class Batcher:
    """Dynamic batching: a request to an idle model runs at once, with whatever else is queued; requests
    that arrive while a batch runs wait for it, then at most `max_wait_ms` more for others, and all of
    them (up to `max_batch_size`, grouped by decoding options) run as one batch. Alone, a client never
    waits for a window; under load, requests share passes, so throughput grows with the number of clients.
    `max_batch_size=1` turns batching off. One thread runs the model, so its CPU threads never compete.

    Any thread may submit, start and close: one lock covers the worker, the queue limit and the closed flag,
    so two threads never start two workers, the limit is exact, and a job is either queued before the
    worker's stop signal (and run) or refused with `Closed`."""

    def __init__(self, captioner: Captioner, max_batch_size: int = MAX_BATCH_SIZE, max_wait_ms: float = BATCH_WAIT_MS,
                 max_queue: int = MAX_QUEUE) -> None:
        if max_batch_size < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self.captioner, self.max_batch_size, self.max_wait = captioner, max_batch_size, max_wait_ms / 1000
        self.max_queue = max_queue
        self.batches = self.images = 0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Start the worker unless it runs (submit does this; calling it first saves the first request the wait)."""
        with self._lock:
            self._start()

    def _start(self) -> None:  # the caller holds the lock
        if self._closed:
            raise Closed("the server is shutting down; no new work is taken")
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="captioner-batcher", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Refuse new work, finish the queued work, then stop the worker. Safe to call more than once."""
        with self._lock:
            if not self._closed and self._thread is not None:
                self._queue.put(None)  # after every job already queued: those still run
            self._closed = True
            thread = self._thread
        if thread is not None:
            thread.join()

    def submit(self, pixels: torch.Tensor, opts: DecodingOptions) -> Future:
        """Queue one preprocessed image (3, S, S); the future gives its `Result`. Raises Busy when the queue
        is full and Closed after `close`."""
        future: Future = Future()
        with self._lock:
            self._start()
            if self._queue.qsize() >= self.max_queue:
                raise Busy(f"{self.max_queue} images are waiting for the model; try again shortly")
            self._queue.put(_Job(pixels, opts, future, time.perf_counter()))
        return future

    async def caption(self, pixels: torch.Tensor, opts: DecodingOptions) -> Result:
        return await asyncio.wrap_future(self.submit(pixels, opts))

    def _gather(self) -> list[_Job] | None:
        """The next batch. An idle worker starts at once with what is queued; after a busy spell, the
        requests that waited behind the last batch wait up to the window for others to join them."""
        idle = self._queue.empty()
        first = self._queue.get()
        if first is None:
            return None
        jobs = [first]
        deadline = time.perf_counter() + (0.0 if idle else self.max_wait)
        while len(jobs) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop after this batch
                self._queue.put(None)
                break
            jobs.append(job)
        return jobs

    def _work(self) -> None:
        while (jobs := self._gather()) is not None:
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # clients that hung up
            groups: dict[DecodingOptions, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.opts, []).append(job)
            for opts, group in groups.items():
                self._run(opts, group)

    def _run(self, opts: DecodingOptions, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            captions = self.captioner.generate(torch.stack([j.pixels for j in jobs]), opts)
        except Exception as err:  # noqa: BLE001 - the callers get the error; the worker lives on
            for job in jobs:
                job.future.set_exception(err)
            return
        model_ms = (time.perf_counter() - start) * 1000
        self.batches += 1
        self.images += len(jobs)
        for job, result in zip(jobs, captions):
            job.future.set_result(Result(result.captions, result.concepts, result.neighbours, len(jobs),
                                         (start - job.queued) * 1000, model_ms))
