"""What the tests share besides fixtures: the repository's paths, small datasets and models written to a temp
folder, and ways to run `captioner` in a child process or behind a real server. Test files import these by
name (`from helpers import ...`); conftest.py keeps the fixtures and the thread settings every test needs."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "examples" / "shapes"
FLICKR8K = os.environ.get("CAPTIONER_FLICKR8K")

# Training scores every epoch with coco-caption, which runs Java: files that train carry this mark.
needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="training scores every epoch with coco-caption, which needs Java")


def random_concepts(decoder: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """concept_input's and concept_copy's classifier comes from the encoder and their layers start at
    (nearly) nothing, so a decoder built in a test would ignore them: random ones, for tests that must
    see those paths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in decoder.state_dict().items():
            if name.startswith(("classifier_", "init_concepts.weight", "copy_gate.")):
                tensor.copy_(torch.randn(tensor.shape, generator=g))
            elif name == "class_word":
                tensor.copy_(torch.randint(0, decoder.vocab_size, tensor.shape, generator=g))
    return decoder


def write_flickr_dataset(folder: Path, n: int = 12, size: int = 48) -> Path:
    """n coloured-noise images with 2 captions each, split 2/3 train, the rest val and test."""
    images = folder / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines, splits = [], {"train": [], "dev": [], "test": []}
    for i in range(n):
        name = f"img{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(images / name)
        colour = ["red", "green", "blue"][i % 3]
        lines += [f"{name}#0\ta {colour} picture of noise", f"{name}#1\tsome {colour} noise ."]
        splits["train" if i < 2 * n // 3 else "dev" if i % 2 else "test"].append(name)
    (folder / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for kind, names in splits.items():
        (folder / f"Flickr_8k.{kind}Images.txt").write_text("\n".join(names) + "\n")
    return folder


def prepare_tiny_flickr(root: Path) -> Path:
    """`captioner prepare` of a 15-image write_flickr_dataset in root: a prepared folder to train on."""
    from captioner.config import Config
    from captioner.features import prepare

    out = root / "prepared"
    prepare(Config(data=str(write_flickr_dataset(root / "data", n=15, size=40)), prepared=str(out), min_count=1),
            log=lambda s: None)
    return out


def train_tiny_model(root: Path, images: int = 9, image_size: int = 0, **train: object) -> tuple[Path, Path]:
    """A tiny model (16-wide decoder) trained for one epoch on a write_flickr_dataset of `images` images in
    root, with `train` options on top: real weights files, a real vocabulary. Returns the prepared folder
    and the model folder."""
    from captioner.config import Config
    from captioner.features import prepare
    from captioner.train import train as run_training

    if shutil.which("java") is None:
        pytest.skip("training scores every epoch with coco-caption, which needs Java")
    data = write_flickr_dataset(root / "data", n=images, size=40)
    prepare(Config(data=str(data), prepared=str(root / "p"), min_count=1, image_size=image_size), log=lambda s: None)
    options = {"epochs": 1, "batch_size": 6, "embed_dim": 16, "attention_dim": 16, "hidden_dim": 16,
               "context_dim": 16, "max_length": 6, "beam_size": 2, **train}
    run_training(Config(prepared=str(root / "p"), run_dir=str(root / "run"), **options), log=lambda s: None)
    return root / "p", root / "run" / "best"


KILLER = r"""
import functools, importlib, os, signal, sys
target, condition, nth, phase, *argv = sys.argv[1:]
module_name, _, attribute = target.partition(":")
*owner_path, name = attribute.split(".")
owner = functools.reduce(getattr, owner_path, importlib.import_module(module_name))
real = getattr(owner, name)
seen = 0

def patched(*args, **kwargs):
    global seen
    if eval(condition):
        seen += 1
        if seen == int(nth):
            if phase == "half":  # the call made with its second argument (the data) cut in half
                real(args[0], bytes(memoryview(args[1])[: len(args[1]) // 2]))
            os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

setattr(owner, name, patched)
from captioner.cli import main
sys.exit(main(argv))
"""


def killer_command(kill: tuple[str, str, int, str], *argv: str) -> list[str]:
    """The command line of `captioner ARGV` in a child that SIGKILLs itself at the n-th call of a function
    whose `args` meet a condition: kill=("module:function", condition, n, phase), where condition is a Python
    expression and phase is "before" (the call) or "half" (after making it with its data cut in half)."""
    target, condition, nth, phase = kill
    return [sys.executable, "-c", KILLER, target, condition, str(nth), phase, *argv]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`captioner ARGS` in a child process from the repository root."""
    return subprocess.run([sys.executable, "-m", "captioner.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def write_synthetic_prepared(root: Path, train_images: int, val_images: int, words: int = 2500, channels: int = 512,
                             seed: int = 0) -> None:
    """A prepared folder of random 7x7 feature maps and random captions (5 per image, 6-14 words from a
    vocabulary of about `words`): training at a real vocabulary and width without encoding any image."""
    from captioner.data import Record
    from captioner.features import DONE, _records_to_json, _save_status, _write_json
    from captioner.vocab import Vocab

    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    lexicon = sorted({"".join(rng.choice(syllables, size=3)) for _ in range(2 * words)})[:words]
    images = root / "images"
    records = [Record(image=images / f"im{i:05d}.jpg", split="train" if i < train_images else "val", root=images,
                      captions=tuple(" ".join(rng.choice(lexicon, size=rng.integers(6, 15))) for _ in range(5)))
               for i in range(train_images + val_images)]
    root.mkdir(parents=True)
    Vocab.build([c for r in records if r.split == "train" for c in r.captions], min_count=1).save(root / "vocab.json")
    shape = (len(records), 49, channels)
    features = np.memmap(root / "features.f16", dtype=np.float16, mode="w+", shape=shape)
    features[:] = rng.standard_normal(shape).astype(np.float16)
    features.flush()
    _save_status(root / "status.npy", np.full(len(records), DONE, dtype=np.uint8))
    _write_json(root / "records.json", _records_to_json(records))
    spec = {"encoder": "synthetic", "image_size": 224, "layer": "head", "channels": channels, "grid": [7, 7],
            "preprocess": "none", "weights": "none"}
    _write_json(root / "features.json", {"spec": spec, "shape": list(shape), "batch_size": 32})


@contextmanager
def running_server(app: object) -> Iterator[str]:
    """The URL of `app` served by uvicorn on a free loopback port in a thread, for real clients."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
