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
from captioner.models import load_model
from captioner.train import train

from helpers import ROOT, needs_java, train_tiny_model, write_flickr_dataset

pytestmark = needs_java


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    return train_tiny_model(tmp_path_factory.mktemp("evaluate"), images=12, epochs=2, batch_size=4, lr=3e-3,
                            beam_size=3)


@pytest.mark.slow
@pytest.mark.cli
def test_evaluate_command_scores_model_and_nearest_neighbour(trained, tmp_path):
    prepared, model = trained
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, "-m", "captioner.cli", "evaluate", "--model", str(model), "--prepared",
                             str(prepared), "--split", "test", "--beam-sizes", "1", "--output", str(out),
                             "--nearest-neighbour", "--block-trigrams", "--length-penalty", "0.5"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    table = [row for row in result.stdout[result.stdout.find("| Model |"):].splitlines() if row.startswith("|")]
    assert table[0].startswith("| Model | BLEU-1") and "CIDEr" in table[0]
    assert [row.split("|")[1].strip() for row in table[2:]] == ["beam 1", "nearest neighbour"]
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == 2 and set(results["scores"]["beam 1"]) == {
        "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert results["decoding"] == {"max_length": 6, "length_penalty": 0.5, "block_trigrams": True, "concepts": True,
                                   "concept_threshold": 0.3, "retrieval": True, "retrieved": 4,
                                   "retrieval_concepts": 0.3, "consensus": False, "concept_check": True,
                                   "decoder_lean": 0.1, "unfamiliar_threshold": 0.9}
    captions = json.loads((out / "captions_beam1.json").read_text())
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions.values())
    assert results["fluency"]["beam 1"] == fluency(list(captions.values()))
    assert set(results["fluency"]) == {"references (the first of each image)", "beam 1"}
    assert "| beam 1 |" in result.stdout and "| Captions | Ends in a function word |" in result.stdout
    assert f"outputs in {out}: captions_beam1.json, results.json" in result.stdout.splitlines()


@pytest.mark.slow
def test_evaluate_scores_a_model_in_its_own_words_on_a_folder_of_another_vocabulary(trained, tmp_path, monkeypatch):
    """A prepared folder's vocabulary is what its training split says; any model on the same features can
    be scored on it (the shipped model on a held-out folder), writing the words it knows."""
    from captioner import evaluate as evaluate_mod

    monkeypatch.setattr(evaluate_mod, "score_captions", lambda predictions, references: {"Bleu_4": 0.0, "CIDEr": 0.0})
    prepared, model = trained
    other = write_flickr_dataset(tmp_path / "other", n=9, size=40)
    (other / "Flickr8k.token.txt").write_text((other / "Flickr8k.token.txt").read_text().replace("noise", "static"))
    prepare(Config(data=str(other), prepared=str(tmp_path / "p2"), min_count=1), log=lambda s: None)
    evaluate_model(model, tmp_path / "p2", beam_sizes=(1,), out_dir=tmp_path / "e", log=lambda s: None)
    words = {w for caption in json.loads((tmp_path / "e" / "captions_beam1.json").read_text()).values()
             for w in caption.split()}
    known = set(load_model(model).vocab.itos)
    assert words and words <= known and "static" not in known


@pytest.mark.slow
def test_evaluate_decodes_with_the_models_own_options_unless_overridden(trained, tmp_path, monkeypatch):
    """The scores must describe what `caption` and `serve` give: the model's beam size, maximum length,
    length penalty and trigram blocking, each overridable. (Scoring is stubbed: the decoding is the point.)"""
    from captioner import evaluate as evaluate_mod

    monkeypatch.setattr(evaluate_mod, "score_captions", lambda predictions, references: {"Bleu_4": 0.0, "CIDEr": 0.0})

    prepared, model = trained
    custom = tmp_path / "model"
    shutil.copytree(model, custom)
    meta = json.loads((custom / "model.json").read_text())
    meta["decoding"] = {"beam_size": 2, "max_length": 5, "length_penalty": 0.7, "block_trigrams": True}
    (custom / "model.json").write_text(json.dumps(meta))
    calls = []
    real = evaluate_mod.beam_search
    keys = ("beam_size", "max_length", "length_penalty", "block_trigrams")

    def record(decoder, features, options):
        calls.append({key: getattr(options, key) for key in keys})
        return real(decoder, features, options)
    monkeypatch.setattr(evaluate_mod, "beam_search", record)
    evaluate_model(custom, prepared, log=lambda s: None)
    assert calls == [{"beam_size": 2, "max_length": 5, "length_penalty": 0.7, "block_trigrams": True}]
    # results go beside the model folder, which a training run may swap out whole (best/)
    assert (tmp_path / "model-eval_test" / "results.json").exists() and not list(custom.glob("eval*"))
    calls.clear()
    evaluate_model(custom, prepared, beam_sizes=(1, 3), out_dir=tmp_path / "b", log=lambda s: None, max_length=4,
                   block_trigrams=False)
    assert calls == [{"beam_size": k, "max_length": 4, "length_penalty": 0.7, "block_trigrams": False} for k in (1, 3)]
    with pytest.raises(ValueError, match="length_penalty must be a number from 0 to 5"):
        evaluate_model(custom, prepared, out_dir=tmp_path / "c", log=lambda s: None, length_penalty=9.0)


@pytest.mark.slow
def test_evaluate_scores_an_ensemble_and_refuses_members_of_another_vocabulary(trained, tmp_path, monkeypatch):
    from captioner import evaluate as evaluate_mod

    monkeypatch.setattr(evaluate_mod, "score_captions", lambda predictions, references: {"Bleu_4": 0.0, "CIDEr": 0.0})
    prepared, model = trained
    alone, twice = tmp_path / "alone", tmp_path / "twice"
    evaluate_model(model, prepared, beam_sizes=(2,), out_dir=alone, log=lambda s: None)
    evaluate_model(model, prepared, beam_sizes=(2,), out_dir=twice, log=lambda s: None, ensemble=[model])
    # a model averaged with itself is the model: the same captions
    assert (twice / "captions_beam2.json").read_text() == (alone / "captions_beam2.json").read_text()
    assert json.loads((twice / "results.json").read_text())["ensemble"] == [str(model)]

    other = write_flickr_dataset(tmp_path / "other", n=9, size=32)
    (other / "Flickr8k.token.txt").write_text((other / "Flickr8k.token.txt").read_text().replace("noise", "static"))
    prepare(Config(data=str(other), prepared=str(tmp_path / "p2"), min_count=1), log=lambda s: None)
    cfg = Config(prepared=str(tmp_path / "p2"), run_dir=str(tmp_path / "run2"), epochs=1, batch_size=4, embed_dim=16,
                 attention_dim=16, hidden_dim=16, context_dim=16, max_length=6)
    train(cfg, log=lambda s: None)
    with pytest.raises(ValueError, match=f"{tmp_path / 'run2' / 'best'} was trained with another vocabulary"):
        evaluate_model(model, prepared, beam_sizes=(1,), log=lambda s: None, ensemble=[tmp_path / "run2" / "best"])


@pytest.mark.slow
def test_an_empty_split_says_so_and_how_to_get_one(trained, capsys, monkeypatch):
    """Not "no captions to measure": which split of which folder is empty, and what to do about it."""
    from captioner.cli import main
    from captioner.features import Prepared

    prepared, model = trained
    indices = Prepared.indices
    monkeypatch.setattr(Prepared, "indices", lambda self, split: [] if split == "test" else indices(self, split))
    for flags in (["--model", str(model)], ["--nearest-neighbour"]):
        assert main(["evaluate", *flags, "--prepared", str(prepared), "--split", "test", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"{prepared}: the test split has no images" in err and "--split-file" in err and "--split val" in err
