"""The scripts outside the package (scripts/assets, bench, probes) still start after the package moves
under them: each answers --help. And the one that users were pointed to, add_retrieval_head, is the
`captioner add-retrieval-head` command now."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.cli import main
from captioner.models import build_decoder, load_model, save_model
from captioner.models.embedder import PooledHead
from captioner.models.files import RETRIEVAL_FILE
from captioner.sentences import SENTENCE_MODEL
from captioner.vocab import Vocab

from helpers import ROOT

SCRIPTS = sorted((ROOT / "scripts").rglob("*.py"))
KINDS = {"assets", "bench", "probes"}


def test_every_script_lives_in_the_folder_of_its_kind():
    assert len(SCRIPTS) >= 20
    assert [p.name for p in SCRIPTS if p.parent.name not in KINDS] == []


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(ROOT / "scripts")) for p in SCRIPTS])
def test_every_script_answers_help(script: Path):
    """Run from the repository root, as the docs do: the imports, the argument parser and any path the
    script finds relative to itself still work where it lives now."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:"), result.stdout[:200]


def test_add_retrieval_head_ships_a_pretrainings_image_side_and_head_with_a_model(tmp_path, capsys):
    spec = {"encoder": "efficientnet_lite0", "channels": 8, "image_size": 224, "layer": "head"}
    args = {"context_dim": 6, "embed_dim": 6, "attention_dim": 6, "hidden_dim": 6}
    decoder = build_decoder("attention", args, 12, 8)
    save_model(tmp_path / "model", decoder, Vocab([f"w{i}" for i in range(8)]), spec, {})
    torch.manual_seed(0)
    side, head = build_decoder("attention", args, 12, 8).image_side(), PooledHead(6, 4)
    torch.save({"decoder": {"family": "attention", "args": args}, "vocab_size": 12, "feature_dim": 8, "region_dim": 6,
                "image_side": side.state_dict(), "head": head.state_dict(), "encoder_spec": spec,
                "sentence_model": SENTENCE_MODEL, "best_epoch": 3}, tmp_path / "pretrain.pt")
    assert main(["add-retrieval-head", "--run", str(tmp_path / "pretrain.pt"), "--model", str(tmp_path / "model")]) == 0
    assert "retrieval.safetensors from" in capsys.readouterr().out
    loaded = load_model(tmp_path / "model")
    assert (tmp_path / "model" / RETRIEVAL_FILE).exists() and loaded.embedder is not None
    torch.testing.assert_close(loaded.embedder.head.proj.weight, head.proj.weight.half().float())

    other = {**spec, "image_size": 260}  # a head trained on other features is refused, by name
    torch.save({**torch.load(tmp_path / "pretrain.pt", weights_only=True), "encoder_spec": other},
               tmp_path / "other.pt")
    assert main(["add-retrieval-head", "--run", str(tmp_path / "other.pt"), "--model", str(tmp_path / "model")]) == 2
    assert "image_size 260" in capsys.readouterr().err
