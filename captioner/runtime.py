"""Where and how a job runs: the device, the processes of a torchrun job, random state, precision,
the optimizer and checkpoints.

Every job (prepare, train, pretraining, caption, bulk, serve) asks here, so a device rule or a
checkpoint format is written once. Helpers take plain values, not a Config, so scripts and tests can
call them without one.
"""
from __future__ import annotations

import contextlib
import gc
import io
import os
import pickle
import platform
import random
import sys
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .atomic import replace_file

OPTIMIZERS = ("adam", "adamw", "rmsprop")


# ---------------------------------------------------------------- devices and processes
# The thread policy (passive OpenMP waiting, one thread per usable core) is captioner.apply_thread_policy in
# __init__.py, not here: it must run before torch is imported, and this module imports torch.


DEVICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, so the same command runs on a laptop and a GPU box. A device this
    machine lacks, or a name torch does not know, is a ValueError saying what to use instead (the README's
    `--device cuda` on a laptop was a 39-line traceback)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use {DEVICES}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this machine has no CUDA (or this torch was built without it); use "
                         "--device cpu, or auto to take CUDA where there is one")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS (Apple GPUs) is not available here; use --device cpu or auto")
    return device


def shard() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; one process without it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(name: str) -> str:
    """'auto' under torchrun on a GPU machine means this rank's own GPU, not all ranks on cuda:0."""
    if name == "auto" and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return name


def setup_distributed(device: str) -> tuple[torch.device, int, int]:
    """Under torchrun (WORLD_SIZE > 1) join the process group (NCCL on GPUs, else gloo) and return this
    rank's device, rank and world size; a single process otherwise."""
    rank, world = shard()
    if world == 1:
        return resolve_device(device), 0, 1
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and device != "cpu":
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local), rank, world
    dist.init_process_group("gloo")
    return torch.device("cpu"), rank, world


def join_barrier(timeout: timedelta) -> None:
    """A CPU-only gloo group for jobs whose ranks only need to wait for each other (bulk captioning);
    joined once per process, left by exit_distributed."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timeout)


def wait_for_all() -> None:
    dist.barrier()


def exit_distributed() -> None:
    """The one way a torchrun process ends: without destroying its process group, whose destructor joins
    a gloo thread that waits for the GIL the destructor holds (a deadlock seen with gdb in a hung test
    run). The command's work, barriers included, is done when this is called."""
    if dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timing measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), printed beside every speed figure: CPUs of one
    architecture differ several-fold in what bfloat16 and the convolutions cost."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                        platform.processor() or platform.machine())
    except OSError:
        return platform.processor() or platform.machine()


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 autocast pays on CUDA and on CPUs with native bfloat16 (AVX512-BF16, AMX): about 1.5x
    faster training on the AMD EPYC where this was measured (docs/BENCHMARKS.md has other CPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@contextlib.contextmanager
def collector_spares_old_objects() -> Iterator[None]:
    """Loading a model allocates enough to set off the garbage collector's full passes, and each walks all
    the ~170,000 objects the imports made (torch's): a third of a cold load on a 2-core machine. They are set
    aside (gc.freeze) while the block runs and given back after, so nothing is left uncollectable; where the
    program froze objects itself (before forking workers), its freeze is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# ---------------------------------------------------------------- random state

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def rank_seed(seed: int, rank: int) -> int:
    """Each DDP rank's own stream, so ranks draw different dropout masks and scheduled-sampling choices."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def rng_state() -> dict:
    """This process's random states as plain tensors, numbers and lists (not numpy or tuples), so a
    checkpoint loads with torch.load(weights_only=True)."""
    version, keys, gauss = random.getstate()
    _, mt, pos, has_gauss, cached = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    state = {"python": [version, list(keys), gauss],
             "numpy": [torch.from_numpy(mt.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Back to a state rng_state() took. The byte tensors must be on the CPU, as load_checkpoint leaves them."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", mt.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def share_scores_and_rng(scores: dict[str, float], world: int) -> tuple[dict[str, float], list[dict]]:
    """Rank 0's dev scores for every rank, and every rank's rng_state() (in rank order) for the
    checkpoint: one collective that all ranks call."""
    if world == 1:
        return scores, [rng_state()]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (scores, rng_state()))
    return gathered[0][0], [state for _, state in gathered]


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Deterministic kernels only (a kernel that has none warns instead of stopping the run), restoring
    the caller's setting afterwards: training is also a library call."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# ---------------------------------------------------------------- optimizer and checkpoints

def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """One of OPTIMIZERS over the trainable parameters."""
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")


def save_checkpoint(path: Path, **state: object) -> None:
    """Through atomic.replace_file: a crash or a full disk mid-write leaves the previous checkpoint whole.
    Serialised in memory first: torch.save writing to a full disk raises a RuntimeError about zip
    offsets, where a plain write raises OSError(ENOSPC), which says what happened."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    replace_file(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def load_checkpoint(path: Path) -> dict:
    """On the CPU, where the RNG byte tensors must be (load_state_dict moves the rest to the model's
    device), and with weights_only=True: a checkpoint holds tensors, numbers, strings, lists and dicts,
    nothing that could run code when loaded, so a file from elsewhere cannot either."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a checkpoint this captioner can load safely "
                         f"({str(err).splitlines()[0]})") from None
