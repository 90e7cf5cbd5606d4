"""Fixtures, and the thread settings every test runs under; the helpers test files import are in helpers.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import ROOT, running_server, write_flickr_dataset

# Two threads here and in every child process (the CLI runs): a convolution's last bits depend on the thread
# count, and tests compare the features a child computes with the features computed in this process.
torch.set_num_threads(2)
os.environ["OMP_NUM_THREADS"] = "2"


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_flickr_dataset(tmp_path / "data")


@pytest.fixture(scope="module")
def server_url():
    """`captioner serve` (the shipped model, the page and the API) on a free loopback port, for real clients."""
    pytest.importorskip("gradio")
    from captioner.pipeline import Captioner
    from captioner.serve import create_app, example_photos

    app = create_app(Captioner.from_pretrained(device="cpu"), examples=example_photos(ROOT / "examples" / "photos"))
    with running_server(app) as url:
        yield url
