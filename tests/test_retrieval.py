"""A model folder's optional image embedder (retrieval.safetensors): read and written by files.py, absent in
old folders, and the vectors bulk captioning writes with it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_models import SHIPPED, small_decoder

from captioner import bulk
from captioner.decoding_options import DecodingOptions
from captioner.models import load_model, save_model
from captioner.models.embedder import ImageEmbedder
from captioner.models.files import RETRIEVAL_FILE, add_retrieval
from captioner.pipeline import Captioner
from captioner.vocab import Vocab


def small_folder(path: Path) -> Path:
    spec = {"encoder": "efficientnet_lite0", "channels": 8, "image_size": 224, "layer": "head"}
    save_model(path, small_decoder("attention"), Vocab([f"w{i}" for i in range(16)]), spec, {"beam_size": 2})
    return path


def embedder(feature_dim: int, seed: int = 0) -> ImageEmbedder:
    torch.manual_seed(seed)
    return ImageEmbedder(feature_dim, 16, 6).eval()


def test_the_embedder_round_trips_in_float16_and_a_folder_without_it_loads_as_before(tmp_path):
    folder = small_folder(tmp_path / "m")
    assert load_model(folder).embedder is None  # an old folder: no vectors
    made = embedder(8)
    add_retrieval(folder, made)
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors", RETRIEVAL_FILE, "vocab.json"]
    loaded = load_model(folder)
    features = torch.randn(3, 9, 8)
    with torch.no_grad():
        got, want = loaded.embedder(features), made(features)
    torch.testing.assert_close(got, want, atol=3e-3, rtol=0)  # float16 weights
    assert torch.allclose(got.norm(dim=1), torch.ones(3))
    assert loaded.decoder.arguments() == small_decoder("attention").arguments()  # the rest of the folder kept
    add_retrieval(folder, embedder(8, seed=1))  # replaced, not added twice
    assert not torch.allclose(load_model(folder).embedder(features), got, atol=1e-2)


def test_an_embedder_for_another_sentence_encoder_is_refused(tmp_path):
    folder = small_folder(tmp_path / "m")
    add_retrieval(folder, embedder(8), sentence_model="some/other-model")
    with pytest.raises(ValueError, match="other-model"):
        load_model(folder)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ["a.jpg", "b/c.png", "d.jpg"]:
        (root / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / name)
    return root


def caption(model: Path, photos: Path, output: Path) -> tuple[dict[str, dict], Captioner]:
    captioner = Captioner.from_pretrained(model, device="cpu")
    bulk.caption_library(captioner, photos, output, DecodingOptions(**{**vars(captioner.defaults), "beam_size": 1}),
                         batch_size=2, workers=1)
    return {r["file"]: r for r in map(json.loads, output.read_text().splitlines())}, captioner


def shipped_attention(path: Path) -> Path:
    """The shipped model's attention decoder alone (its copy path and datastore left out), with no embedder: the
    shipped model of before retrieval, but for the vocabulary rows it grew."""
    from dataclasses import fields

    from captioner.decoder_args import LSTMArgs
    from captioner.models import build_decoder

    shipped = load_model(SHIPPED)
    args = {f.name: getattr(shipped.decoder.args, f.name) for f in fields(LSTMArgs)}
    decoder = build_decoder("attention", args, len(shipped.vocab), shipped.encoder_spec["channels"])
    decoder.load_state_dict(shipped.decoder.state_dict(), strict=False)
    decoding = {k: v for k, v in shipped.decoding.items() if not k.startswith("retriev")}
    save_model(path, decoder, shipped.vocab, shipped.encoder_spec, decoding)
    return path


def test_bulk_lines_carry_the_photo_vector_when_the_model_has_an_embedder(tmp_path, photos):
    model = shipped_attention(tmp_path / "model")
    plain, _ = caption(model, photos, tmp_path / "plain.jsonl")
    assert sorted(plain) == ["a.jpg", "b/c.png", "d.jpg"] and not any("vector" in r for r in plain.values())
    add_retrieval(model, embedder(1280))
    lines, captioner = caption(model, photos, tmp_path / "vectors.jsonl")
    assert [r["captions"] for r in lines.values()] == [plain[f]["captions"] for f in lines]  # captions unchanged
    direct = captioner.embed([photos / f for f in lines])  # the Python API: the same vectors, no captions
    for record, want in zip(lines.values(), direct):
        vector = bulk.decode_vector(record["vector"])
        assert vector.dtype == np.float16 and vector.shape == (6,) and len(record["vector"]) == 16
        assert abs(float(np.linalg.norm(vector.astype(np.float32))) - 1) < 2e-3
        np.testing.assert_allclose(vector.astype(np.float32), want, atol=2e-3)
    # captioning alone (a request, `captioner caption`) does not spend time on vectors it would not return
    assert captioner.generate([Image.open(photos / "a.jpg").convert("RGB")], captioner.defaults)[0].vector is None


def test_the_shipped_model_has_image_vectors_in_minilm_space():
    embedder = load_model(SHIPPED).embedder
    assert embedder is not None
    with torch.no_grad():
        vectors = embedder(torch.rand(2, 49, 1280))
    assert vectors.shape == (2, 384) and torch.allclose(vectors.norm(dim=1), torch.ones(2))


@pytest.mark.slow
@pytest.mark.cli
def test_export_keeps_the_embedder(tmp_path):
    """`captioner export` (a dtype, new decoding defaults) writes a new folder: the photo vectors go with it."""
    from helpers import run_cli

    folder = small_folder(tmp_path / "m")
    made = embedder(8)
    add_retrieval(folder, made)
    result = run_cli("export", str(folder), str(tmp_path / "out"), "--beam-size", "3")
    assert result.returncode == 0, result.stderr
    kept = load_model(tmp_path / "out")
    assert kept.decoding["beam_size"] == 3
    for key, value in made.state_dict().items():
        torch.testing.assert_close(kept.embedder.state_dict()[key], value.to(torch.float16).float())
