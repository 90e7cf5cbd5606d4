"""Bulk captioning of a photo library: `captioner caption LIBRARY/ --output captions.jsonl`.

Made for libraries of hundreds of thousands of files, so nothing grows with the library but the output
and, on a resume, the set of files already done (16 bytes each):
- streaming: the tree is walked lazily, each folder in name order (the same order on every run), and each
  image's JSON line is written and flushed when its batch is done; the list of files and the results are
  never held whole.
- overlapped: worker threads read and resize the next images while the model runs (Pillow and numpy
  release the GIL), at most `PREFETCH_BATCHES` batches ahead.
- resumable: a rerun skips the files the output already holds and cuts off a half-written last line (the
  process was killed mid-write), so each image ends up in the output exactly once.
- a library changes: each line records its photo's size and modification time (`size`, `mtime_ns`), and a
  photo whose size or mtime is no longer its line's is captioned again; its new line is appended, and
  readers (search, write-metadata) take a file's last line as its caption (`last_lines`). `--prune`
  (`prune_output`) rewrites the output without the lines of files that no longer exist and without the
  lines a later one replaced. Lines written before these fields existed count as done by their path.
  `write-metadata`, which changes the photos it writes into, brings their lines to their new size and mtime
  (metadata.refresh_states), so they are not taken for edited.
- locked: the process writing an output holds an OS lock (flock) on OUTPUT.lock (`output_lock`), released
  by the kernel on any exit, kill -9 included; a second run on the same output refuses at once, naming the
  holder's pid, or waits with `--wait`. Two runs appending the same photos would leave each one twice.
- sharded: under torchrun each rank takes the files whose path hash falls to it (stable when files are
  added, so a resumed rank never takes over another's work), writes its own part `OUTPUT.rank0-of-2`,
  and rank 0 merges the parts into OUTPUT once every rank is done (a gloo barrier).

Where the model ships an image embedder (retrieval.safetensors), each line also carries the photo's unit
vector, `"vector"`: base64 of its float16 values, little-endian (1 KB for 384 values), for `captioner search`.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no flock; outputs there go unlocked
    fcntl = None  # type: ignore[assignment]

import numpy as np
import torch
from tqdm import tqdm

from .atomic import replace_file
from .data import IMAGE_SUFFIXES, OTHER_IMAGE_SUFFIXES, ImageError, load_image
from .decoding_options import DecodingOptions
from .pipeline import Captioner, CaptionResult, extras
from .runtime import join_barrier, shard, wait_for_all

PREFETCH_BATCHES = 2  # decoded ahead of the model: enough to never leave it waiting, little memory (~0.6 MB an image)
BARRIER_TIMEOUT = timedelta(days=7)  # ranks that finish early wait for the slowest; torchrun ends them if one dies
# why the walk passes over an entry, in the order the summary lists them
PASSED_OVER = ("not an image", "unsupported format", "hidden", "broken link", "linked folder",
               "reached twice through a link")


def walk_library(root: str | Path, on_error: Callable[[str], None] | None = None,
                 on_skip: Callable[[str, str], None] | None = None) -> Iterator[str]:
    """Relative POSIX paths of the image files under `root`, lazily, depth first, each folder in name order.

    Only the folders on the current path are listed in memory at any time. Hidden entries (`.thumbnails`,
    macOS `._IMG.jpg` forks) and symlinked folders (which can loop) are skipped; a folder that cannot be
    listed is reported to `on_error` and the walk goes on. Each photo is found once, so it is captioned once:
    a link to a photo (or a folder) that the walk reaches by its own path too is passed over, and of several
    links to a photo it does not reach (outside the library, or hidden), all but the first. Each entry passed
    over goes to `on_skip` with its reason (one of PASSED_OVER; a hidden or linked folder once, with a
    trailing slash), so a summary can say what a library held besides the photos captioned."""
    real_root = os.path.realpath(root)
    inside = os.path.join(real_root, "")  # what the real paths in the library start with
    linked_only: set[str] = set()  # photos reached through links alone (outside, or hidden): only these are kept

    def skip(key: str, reason: str) -> None:
        if on_skip is not None:
            on_skip(key, reason)

    def walked_by_own_path(real: str, folder: bool) -> bool:
        """Whether the walk reaches a real path by itself: in the library, not hidden, and (a file) an image."""
        if real != real_root and not real.startswith(inside):
            return False
        relative = os.path.relpath(real, real_root)
        if relative != "." and any(part.startswith(".") for part in Path(relative).parts):
            return False
        return folder or os.path.splitext(real)[1].lower() in IMAGE_SUFFIXES

    def link(entry: os.DirEntry, key: str, suffix: str) -> Iterator[str]:
        """A symlink: its photo if the walk finds it nowhere else, else why it is passed over."""
        try:
            target = os.stat(entry.path)  # follows the link; a loop raises ELOOP
        except OSError:
            skip(key, "broken link")
            return
        real = os.path.realpath(entry.path)
        if S_ISDIR(target.st_mode):
            skip(key + "/", "reached twice through a link" if walked_by_own_path(real, True) else "linked folder")
        elif suffix not in IMAGE_SUFFIXES or not S_ISREG(target.st_mode):
            skip(key, "unsupported format" if suffix in OTHER_IMAGE_SUFFIXES else "not an image")
        elif walked_by_own_path(real, False) or real in linked_only:
            skip(key, "reached twice through a link")
        else:
            linked_only.add(real)
            yield key

    def visit(folder: str, prefix: str) -> Iterator[str]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            if not prefix:
                raise
            if on_error is not None:
                on_error(f"{prefix}: cannot list folder: {err.strerror or err}")
            return
        for entry in entries:
            key = prefix + entry.name
            if entry.name.startswith("."):
                skip(key + "/" if entry.is_dir(follow_symlinks=False) else key, "hidden")
                continue
            suffix = os.path.splitext(entry.name)[1].lower()
            if entry.is_symlink():
                yield from link(entry, key, suffix)
            elif entry.is_dir(follow_symlinks=False):
                yield from visit(entry.path, key + "/")
            elif suffix in IMAGE_SUFFIXES and entry.is_file(follow_symlinks=False):
                yield key
            elif on_skip is not None:
                skip(key, "unsupported format" if suffix in OTHER_IMAGE_SUFFIXES else "not an image")

    yield from visit(os.fspath(root), "")


def library_path(library: Path, key: str) -> Path:
    """The file a JSONL line's `file` names under `library`; a name that would lead out of it (absolute, or
    through `..`) raises ValueError, so a line edited by hand or a web request cannot reach other files."""
    if not key or Path(key).is_absolute() or ".." in Path(key).parts:
        raise ValueError(f"{key!r} is not a path inside the library {library}")
    return library / key


def captioned_library(jsonl: str | Path, photos: str | Path) -> tuple[Path, Path]:
    """A bulk JSONL and the folder it captioned, checked before anything reads them, for the commands that
    use both (write-metadata, serve --library)."""
    jsonl, photos = Path(jsonl), Path(photos)
    if not jsonl.is_file():
        raise FileNotFoundError(f"{jsonl}: no such file (make one with `captioner caption LIBRARY/ --output "
                                f"{jsonl.name}`)")
    if not photos.is_dir():
        raise FileNotFoundError(f"{photos}: not a folder (give the library folder {jsonl.name} was made from)")
    return jsonl, photos


def path_hash(key: str) -> bytes:
    """16-byte hash of a relative path: what the done set stores and what decides a file's rank."""
    return hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def rank_of(digest: bytes, world: int) -> int:
    return int.from_bytes(digest[:8], "big") % world


def state_hash(key: str, size: int, mtime_ns: int) -> bytes:
    """16-byte hash of a path with its file's size and mtime: what the done set stores for a line that records
    them, so a photo edited since its line is no longer "done" and is captioned again."""
    return path_hash(f"{key}\0{size}\0{mtime_ns}")


def line_digest(record: dict) -> bytes:
    """The done set's entry for a line: its file's state where the line records it, else (a line written before
    lines had `size` and `mtime_ns`) its path alone."""
    size, mtime = record.get("size"), record.get("mtime_ns")
    if isinstance(size, int) and isinstance(mtime, int):
        return state_hash(record["file"], size, mtime)
    return path_hash(record["file"])


def file_state(stat: os.stat_result) -> dict:
    """What a line records of its file to notice an edit: size and mtime, to the nanosecond."""
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class OutputLocked(OSError):
    """Another process holds the output's lock (the message names it)."""


def locked_message(output: Path, holder: str) -> str:
    return f"{output} is being written by {holder}; wait for it to finish, or add --wait to wait for it"


@contextlib.contextmanager
def output_lock(output: str | Path, wait: bool = False, command: str = "captioner") -> Iterator[Path]:
    """Hold an exclusive OS lock on OUTPUT.lock while the output is written. flock is released by the kernel
    when the process ends however it ends (kill -9 too), so a lock is never left stale; the file stays, with
    the holder's pid, host and start time in it, for the next run's message. Without `wait`, a held lock
    raises OutputLocked at once; with it, the run says whom it waits for and waits."""
    output = Path(output)
    lock = output.with_name(output.name + ".lock")
    if fcntl is None:
        yield lock
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            if not wait:
                raise OutputLocked(locked_message(output, holder)) from None
            tqdm.write(f"{output}: waiting for {holder} to finish", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({command}) on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield lock
    finally:
        os.close(fd)  # releases the lock


def lock_holder(output: str | Path) -> str | None:
    """Who holds the output's lock now (what OUTPUT.lock says of them), or None when it is free: a check a
    command makes before loading its model, so a second run refuses at once."""
    output = Path(output)
    lock = output.with_name(output.name + ".lock")
    if fcntl is None or not lock.exists():
        return None
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
    finally:
        os.close(fd)
    return None


def last_lines(path: Path) -> Iterator[tuple[int, bytes, dict]]:
    """read_lines, without the lines a later line of the same file replaced (a photo captioned again after
    an edit, or an output two unlocked runs appended to): each file once, at its last line's place. A first
    pass keeps 24 bytes a line (path hash, line number)."""
    digests, numbers = bytearray(), []
    for number, (_, _, record) in enumerate(read_lines(path)):
        digests += path_hash(record["file"])
        numbers.append(number)
    if not numbers:
        return
    hashes = np.frombuffer(bytes(digests), dtype="S16")
    # the last line of each hash: unique over the reversed array gives each hash's first index there
    _, first_reversed = np.unique(hashes[::-1], return_index=True)
    keep = np.zeros(len(hashes), dtype=bool)
    keep[len(hashes) - 1 - first_reversed] = True
    for number, item in enumerate(read_lines(path)):
        if number < len(keep) and keep[number]:
            yield item


def prune_output(output: Path, library: Path) -> int:
    """Rewrite the output (atomically) without the lines of files no longer in the library and without
    lines a later one replaced; returns how many lines were dropped. The caller holds the output's lock."""
    if not output.exists():
        return 0
    total = sum(1 for _ in read_lines(output))
    kept = 0

    def present(key: str) -> bool:
        try:
            return library_path(library, key).is_file()
        except ValueError:  # a path out of the library: not one of its files
            return False

    def write(scratch: Path) -> None:
        nonlocal kept
        with open(scratch, "wb") as out:
            for _, line, record in last_lines(output):
                if present(record["file"]):
                    out.write(line)
                    kept += 1

    replace_file(output, write)
    return total - kept


class DoneSet:
    """The files an output already holds, as a sorted array of their 16-byte path hashes: 16 bytes a file
    (16 MB for a million) where a set of path strings would take about ten times that. A false "done"
    needs a 128-bit collision (about 1e-27 for a million files)."""

    def __init__(self, hashes: bytes | bytearray = b"") -> None:
        self._hashes = np.unique(np.frombuffer(bytes(hashes), dtype="S16"))  # sorted, each once

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, digest: bytes) -> bool:
        i = int(np.searchsorted(self._hashes, digest))
        # numpy gives "S" items back without their trailing NUL bytes; strip ours the same way to compare
        return i < len(self._hashes) and self._hashes[i] == digest.rstrip(b"\0")


@dataclass
class Summary:
    """What one rank did: images captioned and files that failed in this run, files found already done, and
    the entries of its share the walk passed over, by reason (PASSED_OVER)."""

    captioned: int = 0
    failed: int = 0
    already_done: int = 0
    seconds: float = 0.0
    pruned: int | None = None  # lines --prune dropped (None: no --prune)
    passed_over: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        """The run's last line on stderr (after `captioner caption: `), with what the walk passed over and why,
        so a folder of HEICs without the extra, or of broken links, does not end in a silent "0 captioned"."""
        skipped = ""
        if self.passed_over:
            reasons = ", ".join(f"{self.passed_over[r]} {r}" for r in PASSED_OVER if self.passed_over.get(r))
            skipped = f", {sum(self.passed_over.values())} passed over ({reasons})"
        rate = self.captioned / max(self.seconds, 1e-9)
        pruned = "" if self.pruned is None else f", {self.pruned} lines pruned (gone or replaced)"
        return (f"{self.captioned} images captioned, {self.failed} unreadable (listed with their error), "
                f"{self.already_done} already done{skipped}{pruned}; {rate:.1f} images/s")


def part_path(output: Path, rank: int, world: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}-of-{world}")


def existing_parts(output: Path) -> list[Path]:
    """Parts of this output left by any run, in name order."""
    if not output.parent.is_dir():
        return []
    pattern = re.compile(re.escape(output.name) + r"\.rank\d+-of-\d+")  # not a part's .lock or .tmp
    return sorted(p for p in output.parent.iterdir() if pattern.fullmatch(p.name))


def read_lines(path: Path, start: int = 0) -> Iterator[tuple[int, bytes, dict]]:
    """(end offset, raw line, record) of each complete line of an output file from byte `start` (a line's
    start); a last line without its newline was cut short by a kill and is left out. A damaged line
    elsewhere raises, naming file and line."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return
            offset += len(line)
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("file"), str):
                    raise ValueError("no 'file' field")
            except ValueError as err:
                where = f"line {number}" + (f" after byte {start}" if start else "")
                raise ValueError(f"{path}, {where}: not a caption record ({err}); fix or delete the line, "
                                 "then run again") from None
            yield offset, line, record


def read_done(captioner: Captioner, decoding: dict, output: Path, target: Path, rank: int, world: int) -> DoneSet:
    """This rank's files already captioned (or failed): in the merged output, in its own part (whose
    half-written last line is cut off here), and in parts left by a run with another number of ranks.
    Other ranks' parts of this run hold none of its files, so they are not read. Captions by another
    model, or by this one under other decoding options, are refused: a resume must not mix two."""
    sources = [p for p in existing_parts(output) if p != target and not p.name.endswith(f"-of-{world}")]
    hashes = bytearray()
    for source in ([output] if output != target else []) + sources + [target]:
        end = 0
        for end, _, record in read_lines(source):  # noqa: B007 - the last line's end is read after the loop
            digest = path_hash(record["file"])
            if rank_of(digest, world) != rank:
                continue
            model = record.get("model"), record.get("version")
            if "error" not in record and model != (captioner.name, captioner.version):
                raise ValueError(f"{source}: has captions by model {model[0]!r} version {model[1]!r}, but this run "
                                 f"uses {captioner.name!r} version {captioner.version!r}; give another --output, "
                                 "or delete it to start over")
            # an option newer than the line decoded it at its default
            saved = {**asdict(DecodingOptions()), **record.get("decoding", {})}
            if "error" not in record and "decoding" in record and saved != decoding:
                changed = ", ".join(f"{k} {saved.get(k)!r} -> {v!r}" for k, v in decoding.items() if saved.get(k) != v)
                raise ValueError(f"{source}: has captions decoded with other options ({changed}); one output holds "
                                 "one decoding, so give another --output, the same options, or delete it to start over")
            hashes += line_digest(record)
        if source == target and source.exists() and source.stat().st_size > end:
            with open(source, "r+b") as f:
                f.truncate(end)
            tqdm.write(f"{source}: cut off a half-written last line; its image is captioned again", file=sys.stderr)
    return DoneSet(hashes)


def caption_share(captioner: Captioner, library: str | Path, output: str | Path, opts: DecodingOptions,
                  batch_size: int = 16, workers: int = 2, rank: int = 0, world: int = 1,
                  progress: bool = True, verbose: bool = False) -> Summary:
    """Caption this rank's share of the library's images not yet in the output, appending one JSON line
    per image to the output (one process) or to this rank's part (several). With `verbose`, each entry of
    the share the walk passes over is named on stderr with its reason as the walk meets it (nothing is
    held: a library can pass over thousands of sidecars), so the summary's counts can be checked."""
    library, output = Path(library), Path(output)
    if not library.is_dir():
        raise FileNotFoundError(f"{library}: not a folder (a .jsonl --output captions one library folder)")
    if batch_size < 1 or workers < 1:
        raise ValueError("batch_size and workers must be at least 1")
    target = output if world == 1 else part_path(output, rank, world)
    decoding = asdict(opts)
    done = read_done(captioner, decoding, output, target, rank, world)
    summary = Summary()

    def count_done() -> None:
        summary.already_done += 1

    def count_passed_over(key: str, reason: str) -> None:
        if rank_of(path_hash(key), world) == rank:  # each rank counts its share: the ranks' counts add up
            summary.passed_over[reason] = summary.passed_over.get(reason, 0) + 1
            if verbose:
                tqdm.write(f"passed over {key}: {reason}", file=sys.stderr)  # above the progress bar
    start = time.perf_counter()
    tty = sys.stderr.isatty()
    stop = threading.Event()
    load = functools.partial(load_preprocessed, captioner, library)
    # The ETA needs the number of files to do: a second walk counts them in the background, and the bar
    # gets its total (and its ETA) when the count is in, instead of the run waiting for a full listing.
    with ThreadPoolExecutor(1) as counter, ThreadPoolExecutor(workers) as pool, \
            open(target, "a", encoding="utf-8") as out, \
            tqdm(unit="img", desc=f"rank {rank}" if world > 1 else "captions", disable=not progress,
                 mininterval=0.5 if tty else 30, dynamic_ncols=True) as bar:
        total: Future | None = counter.submit(count_until, todo(library, done, rank, world, None), stop)
        batch: list[tuple[str, torch.Tensor, os.stat_result]] = []
        try:
            for key, image in prefetched(todo(library, done, rank, world, warn_skipped, count_passed_over,
                                              count_done),
                                         load, pool, PREFETCH_BATCHES * batch_size):
                try:
                    batch.append((key, *image.result()))
                except ImageError as err:
                    out.write(json_line({"file": key, "error": str(err), **error_state(library / key)}))
                    out.flush()
                    summary.failed += 1
                    bar.update(1)
                if len(batch) == batch_size:
                    summary.captioned += write_batch(out, captioner, batch, opts, decoding, bar)
                    batch = []
                if total is not None and total.done():
                    bar.total, total = total.result(), None
                    bar.refresh()
            if batch:
                summary.captioned += write_batch(out, captioner, batch, opts, decoding, bar)
        finally:
            stop.set()
    summary.seconds = time.perf_counter() - start
    return summary


def todo(library: Path, done: DoneSet, rank: int, world: int, warn: Callable[[str], None] | None,
         on_skip: Callable[[str, str], None] | None = None, on_done: Callable[[], None] | None = None) -> Iterator[str]:
    """This rank's files of the library (relative paths) not in `done` (by their path and their size and
    mtime now: `line_digest`), in walk order; each file found done goes to `on_done`."""
    for key in walk_library(library, on_error=warn, on_skip=on_skip):
        digest = path_hash(key)
        if rank_of(digest, world) != rank:
            continue
        if digest not in done:
            try:
                stat = os.stat(library / key)
            except OSError:
                yield key  # gone since the walk saw it: loading it says so, in its line
                continue
            if state_hash(key, stat.st_size, stat.st_mtime_ns) not in done:
                yield key
                continue
        if on_done is not None:
            on_done()


def warn_skipped(message: str) -> None:
    tqdm.write(f"skipped {message}", file=sys.stderr)  # above the progress bar, not through it


def count_until(keys: Iterator[str], stop: threading.Event) -> int:
    """How many keys there are; gives up when the run ends first (Ctrl-C, on a slow network share)."""
    return sum(1 for _ in itertools.takewhile(lambda _: not stop.is_set(), keys))


def load_preprocessed(captioner: Captioner, library: Path, key: str) -> tuple[torch.Tensor, os.stat_result]:
    """An image ready for the model, and its file's stat taken before reading (an edit while it is read
    then shows on the next run)."""
    try:
        stat = os.stat(library / key)
    except OSError as err:
        raise ImageError(f"{key}: {err.strerror or err}") from None
    return captioner.encoder.preprocess(load_image(library / key, name=key)), stat


def error_state(path: Path) -> dict:
    """The size and mtime of a file that could not be read, for its error line (a fixed file is retried)."""
    try:
        return file_state(os.stat(path))
    except OSError:
        return {}


def prefetched(keys: Iterator[str], load: Callable[[str], Any], pool: ThreadPoolExecutor,
               ahead: int) -> Iterator[tuple[str, Future]]:
    """(key, the future of its loaded image) in order, with up to `ahead` images read in the background."""
    pending: deque[tuple[str, Future]] = deque()
    for key in keys:
        pending.append((key, pool.submit(load, key)))
        if len(pending) > ahead:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


def encode_vector(vector: np.ndarray) -> str:
    """A photo's vector as its JSONL line stores it: base64 of float16, little-endian."""
    return base64.b64encode(np.asarray(vector, dtype="<f2").tobytes()).decode("ascii")


def decode_vector(text: str) -> np.ndarray:
    """A JSONL line's `vector` back as float16 values."""
    return np.frombuffer(base64.b64decode(text), dtype="<f2").astype(np.float16)


def json_line(record: dict) -> str:
    """One JSONL line, UTF-8 as it is (`"Café.jpg"`, not `"Caf\\u00e9.jpg"`) so the file reads as the library
    does. A file name that is not valid UTF-8 reaches Python as lone surrogates, which UTF-8 cannot encode: that
    line keeps JSON's \\u escapes, which read back to the same name."""
    text = json.dumps(record, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(record)
    return text + "\n"


def caption_record(key: str, captioner: Captioner, result: CaptionResult, decoding: dict,
                   stat: os.stat_result | None = None) -> dict:
    """One captioned photo's JSONL line."""
    record = {"file": key, "captions": captioner.as_dicts(result.captions), **extras(result),
              "model": captioner.name, "version": captioner.version, "decoding": decoding,
              **(file_state(stat) if stat is not None else {})}
    if result.vector is not None:
        record["vector"] = encode_vector(result.vector)
    return record


def write_batch(out: IO[str], captioner: Captioner, batch: list[tuple[str, torch.Tensor, os.stat_result]],
                opts: DecodingOptions, decoding: dict, bar: tqdm) -> int:
    """Caption a batch and append its JSON lines, flushed (what is on disk is whole lines); how many."""
    results = captioner.generate(torch.stack([x for _, x, _ in batch]), opts, vectors=True)
    out.write("".join(json_line(caption_record(key, captioner, result, decoding, stat))
                      for (key, _, stat), result in zip(batch, results)))
    out.flush()
    bar.update(len(batch))
    return len(batch)


def merge_parts(output: str | Path) -> int:
    """Append the parts' lines to the output, each file once, then delete the parts; returns the lines added.

    The merged file is written beside the output and renamed over it (atomic.py), so a kill mid-merge leaves either
    the old output and all parts, or the merged output and parts whose lines it already holds (skipped on
    the next merge)."""
    output = Path(output)
    parts = existing_parts(output)
    if not parts:
        return 0
    hashes, end = bytearray(), 0
    for end, _, record in read_lines(output):  # noqa: B007 - the last line's end is read after the loop
        hashes += path_hash(record["file"])
    merged, added = DoneSet(hashes), 0

    def write(scratch: Path) -> None:
        nonlocal added
        if end:
            shutil.copyfile(output, scratch)
        with open(scratch, "r+b" if end else "wb") as out:
            out.truncate(end)  # without a half-written last line
            out.seek(end)
            for part in parts:
                for _, line, record in read_lines(part):
                    if path_hash(record["file"]) not in merged:
                        out.write(line)
                        added += 1

    replace_file(output, write)
    for part in parts:
        part.unlink()
        part.with_name(part.name + ".lock").unlink(missing_ok=True)  # its rank is done with it
    return added


def caption_library(captioner: Captioner, library: str | Path, output: str | Path, opts: DecodingOptions,
                    batch_size: int = 16, workers: int = 2, prune: bool = False, wait: bool = False,
                    verbose: bool = False) -> Summary:
    """The whole job for this process: its share (all of it without torchrun), then, once every rank is
    done, rank 0 merges the parts (also parts an earlier run left) into the output and, with `prune`, drops
    the lines of files gone from the library and lines replaced by a later one; `verbose` names each file
    passed over (caption_share). Rank 0 holds the output's
    lock throughout, every other rank its part's (`output_lock`)."""
    rank, world = shard()
    output = Path(output)
    with output_lock(output if rank == 0 else part_path(output, rank, world), wait, "captioner caption"):
        if world > 1:
            join_barrier(BARRIER_TIMEOUT)
        summary = caption_share(captioner, library, output, opts, batch_size=batch_size, workers=workers,
                                rank=rank, world=world, progress=rank == 0, verbose=verbose)
        if world > 1:
            wait_for_all()
        if rank == 0:
            merge_parts(output)
            if prune:
                summary.pruned = prune_output(output, Path(library))
    return summary
