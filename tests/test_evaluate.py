import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.config import Config
from captioner.evaluate import evaluate_model
from captioner.features import prepare
from captioner.metrics import fluency
from captioner.train import train

from conftest import ROOT, write_flickr_dataset

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="coco-caption needs Java")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    data = write_flickr_dataset(root / "data", n=12, size=40)
    prepare(Config(data=str(data), prepared=str(root / "p"), min_count=1), log=lambda s: None)
    cfg = Config(prepared=str(root / "p"), run_dir=str(root / "run"), epochs=2, batch_size=4, embed_dim=16,
                 attention_dim=16, hidden_dim=16, context_dim=16, max_length=6, lr=3e-3)
    train(cfg, log=lambda s: None)
    return root / "p", root / "run" / "best"


def test_evaluate_command_scores_model_and_nearest_neighbour(trained, tmp_path):
    prepared, model = trained
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, "-m", "captioner.cli", "evaluate", "--model", str(model), "--prepared",
                             str(prepared), "--split", "test", "--beam-sizes", "1", "--output", str(out),
                             "--nearest-neighbour"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    table = [l for l in result.stdout[result.stdout.find("| Model |"):].splitlines() if l.startswith("|")]
    assert table[0].startswith("| Model | BLEU-1") and "CIDEr" in table[0]
    assert [l.split("|")[1].strip() for l in table[2:]] == ["beam 1", "nearest neighbour"]
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == 2 and set(results["scores"]["beam 1"]) == {
        "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    captions = json.loads((out / "captions_beam1.json").read_text())
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions.values())
    assert results["fluency"]["beam 1"] == fluency(list(captions.values()))
    assert set(results["fluency"]) == {"references (the first of each image)", "beam 1"}
    assert "| beam 1 |" in result.stdout and "| Captions | Ends in a function word |" in result.stdout


def test_evaluate_refuses_a_model_of_another_vocabulary(trained, tmp_path):
    prepared, model = trained
    other = write_flickr_dataset(tmp_path / "other", n=9, size=32)
    (other / "Flickr8k.token.txt").write_text((other / "Flickr8k.token.txt").read_text().replace("noise", "static"))
    prepare(Config(data=str(other), prepared=str(tmp_path / "p2"), min_count=1), log=lambda s: None)
    with pytest.raises(ValueError, match="another vocabulary"):
        evaluate_model(model, tmp_path / "p2", beam_sizes=(1,), log=lambda s: None)
