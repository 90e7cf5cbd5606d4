"""The ONNX backend: export, the same captions under onnxruntime, int8, refusing graphs from other weights."""
from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

from captioner.config import Config  # noqa: E402
from captioner.decoding import beam_search  # noqa: E402
from captioner.decoding_options import DecodingOptions  # noqa: E402
from captioner.encoders import create_encoder, image_transforms  # noqa: E402
from captioner.extras import install_hint  # noqa: E402
from captioner.models import (  # noqa: E402
    DECODERS,
    decoder_class,
    decoder_from_config,
    save_model,
    weights_sha256,  # noqa: E402
)
from captioner.onnx_backend import CONCEPT_HEAD, GRAPHS, OnnxDecoder, open_session, require_onnxruntime  # noqa: E402
from captioner.onnx_export import TOLERANCE, _stamp, compare, export_decoder, quantize_decoder, verify  # noqa: E402
from captioner.pipeline import Captioner  # noqa: E402
from captioner.vocab import Vocab  # noqa: E402

from helpers import ROOT, random_concepts, run_cli  # noqa: E402

PHOTOS = sorted((ROOT / "examples" / "photos").glob("*.jpg"))
TINY = dict(context_dim=16, embed_dim=16, attention_dim=16, hidden_dim=16, model_dim=16, transformer_heads=2,
            transformer_layers=2, encoder_layers=1, ff_dim=32)
# every family, and the options that change the step's graph (hard attention's expectation is its default)
VARIANTS = {**{family: (family, {}) for family in DECODERS}, "attention-2-heads": ("attention", {"attention_heads": 2}),
            "hard-attention-argmax": ("hard-attention", {"hard_decode": "argmax"}),
            "attention-concept-input": ("attention-concepts", {"concept_input": True}),
            "attention-concept-copy": ("attention-concepts", {"concept_copy": True})}
WORDS = "a dog cat man woman runs sits on the grass red blue ball water in with".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small attention decoder (random weights) on the real Lite0 encoder, saved as a model folder."""
    encoder = create_encoder("efficientnet_lite0")
    vocab = Vocab(WORDS)
    torch.manual_seed(0)
    cfg = Config(context_dim=32, embed_dim=16, attention_dim=16, hidden_dim=32)
    decoder = decoder_from_config(cfg, len(vocab), encoder.channels)
    with torch.no_grad():  # sharper next-word distributions than at initialisation: no near-ties in beam search
        decoder.out.weight.mul_(8)
    path = tmp_path_factory.mktemp("onnx") / "model"
    save_model(path, decoder, vocab, encoder.spec(),
               {"beam_size": 3, "max_length": 8, "length_penalty": 0.0, "block_trigrams": False})
    return path


@pytest.fixture(scope="module")
def exported(model_dir) -> Path:
    """The model exported by the command line, checked on two photos."""
    out = model_dir.parent / "onnx"
    result = run_cli("export", "--format", "onnx", str(model_dir), str(out), "--check-images", *map(str, PHOTOS[:2]))
    assert result.returncode == 0, result.stderr
    assert f"{out}: ONNX graphs (float32 weights)" in result.stdout and not out.with_name("onnx.tmp").exists()
    return out


@pytest.mark.slow
@pytest.mark.cli
def test_export_writes_a_self_contained_folder_that_records_its_origin(model_dir, exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted([*GRAPHS.values(), CONCEPT_HEAD, "model.json",
                                                                 "vocab.json"])
    meta = json.loads((exported / "model.json").read_text())
    source = json.loads((model_dir / "model.json").read_text())
    assert meta["decoding"] == source["decoding"] and meta["encoder"] == source["encoder"]
    info = meta["onnx"]
    assert info["weights_sha256"] == weights_sha256(model_dir / "model.safetensors")
    assert info["state"] == ["h", "c", "features", "keys"] and info["step_outputs"] == ["h", "c"]
    assert info["check"]["same_captions"] == 2 and info["check"]["max_logprob_diff"] <= TOLERANCE
    assert (exported / "vocab.json").read_text() == (model_dir / "vocab.json").read_text()


@pytest.mark.slow
@pytest.mark.cli
def test_onnxruntime_gives_pytorchs_captions(model_dir, exported):
    reference = Captioner.from_pretrained(model_dir, device="cpu")
    runtime = Captioner.from_pretrained(exported, backend="onnx")
    assert isinstance(runtime.decoder, OnnxDecoder)
    images = [Image.open(p) for p in PHOTOS]  # a batch of 5: the graphs were exported with other sizes
    agreement = compare(reference, runtime, images)
    assert agreement.same_captions == len(images) and agreement.max_logprob_diff <= TOLERANCE
    # the n-best lists too, with their scores, and the attention behind each word
    ours = reference(PHOTOS, beam_size=4, num_captions=4)
    theirs = runtime(PHOTOS, beam_size=4, num_captions=4)
    assert [[c["generated_text"] for c in r] for r in ours] == [[c["generated_text"] for c in r] for r in theirs]
    for r, o in zip(ours, theirs):
        assert [c["score"] for c in r] == pytest.approx([c["score"] for c in o], abs=1e-3)
    # the export carries the encoder's ImageNet head: the same concepts (the cat, the espresso) either way
    assert runtime.concepts is not None
    def words(results: list) -> list[list[str]]:
        return [[k["word"] for k in r[0]["concepts"]] for r in results]
    assert words(ours) == words(theirs)
    assert any(k["word"] == "cat" for k in ours[PHOTOS.index(ROOT / "examples/photos/chelsea.jpg")][0]["concepts"])
    a, b = reference.attention(PHOTOS[0]), runtime.attention(PHOTOS[0])
    assert a["words"] == b["words"] and abs(a["alphas"] - b["alphas"]).max() < 1e-4
    assert a["image"].tobytes() == b["image"].tobytes()
    assert runtime.version == reference.version != ""  # named by the weights it came from


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_family_exports_and_searches_alike(variant, tmp_path):
    """The decoder's graphs alone, for each registered family: growing state (the transformer's key/value
    cache) and pass-through state (the regions' keys) included."""
    family, args = VARIANTS[variant]
    torch.manual_seed(0)
    names = {f.name for f in fields(decoder_class(family).Args)}
    cfg = Config(decoder=family, **{k: v for k, v in TINY.items() if k in names}, **args)
    decoder = decoder_from_config(cfg, 30, 8).eval()
    if cfg.concept_input or cfg.concept_copy:
        random_concepts(decoder)
    info = export_decoder(decoder, torch.randn(5, 49, 8), 30, tmp_path, "0" * 64)
    runtime = OnnxDecoder(open_session(tmp_path / GRAPHS["init"], None), open_session(tmp_path / GRAPHS["step"], None),
                          info["state"], info["step_outputs"])
    features = torch.randn(3, 49, 8)
    with torch.inference_mode():
        ours = beam_search(decoder, features, DecodingOptions(beam_size=4, max_length=12, num_captions=2))
        theirs = beam_search(runtime, features, DecodingOptions(beam_size=4, max_length=12, num_captions=2))
        state = runtime.init_state(features)
        logprobs, new, alpha = runtime.step(torch.tensor([1, 1, 1]), state)
    assert [[c.tokens for c in r] for r in ours] == [[c.tokens for c in r] for r in theirs]
    assert max(abs(a.logprob - b.logprob) for r, o in zip(ours, theirs) for a, b in zip(r, o)) <= TOLERANCE
    assert logprobs.shape == (3, 30) and alpha.shape[0] == 3
    unchanged = [n for n in info["state"] if n not in info["step_outputs"]]
    assert unchanged and all(new[n] is state[n] for n in unchanged)  # so beam search leaves them in place
    assert all(new[n] is not state[n] for n in info["step_outputs"])


def test_preprocessing_without_the_network_is_the_encoders():
    encoder = create_encoder("efficientnet_lite0", pretrained=False, image_size=200)
    crop, preprocess = image_transforms(encoder.spec(), "crop")
    image = Image.open(PHOTOS[0])
    assert torch.equal(preprocess(image), encoder.preprocess(image))
    assert crop(image).tobytes() == encoder.crop(image).tobytes()
    wide = image.resize((300, 200))
    encoder.fit = "squash"  # an exported model fits photos as its model.json says, as the PyTorch model does
    crop, preprocess = image_transforms(encoder.spec(), "squash")
    assert torch.equal(preprocess(wide), encoder.preprocess(wide))
    assert crop(wide).tobytes() == encoder.crop(wide).tobytes() != create_encoder(
        "efficientnet_lite0", pretrained=False, image_size=200).crop(wide).tobytes()
    with pytest.raises(ValueError, match="timm:resnet18"):
        image_transforms({**encoder.spec(), "encoder": "timm:resnet18", "preprocess": "crop_pct=0.875"}, "crop")


@pytest.mark.slow
@pytest.mark.cli
def test_the_export_check_catches_graphs_that_disagree(model_dir, exported):
    reference = Captioner.from_pretrained(model_dir, device="cpu")
    images = [Image.open(PHOTOS[0])]
    assert verify(reference, exported, images, log=lambda s: None).same_captions == 1
    with torch.no_grad():  # PyTorch now computes something else than the graphs do
        reference.decoder.out.bias.add_(torch.linspace(-3, 3, len(WORDS) + 4))
    with pytest.raises(ValueError, match="the exported graphs disagree with PyTorch"):
        verify(reference, exported, images, log=lambda s: None)


@pytest.mark.slow
@pytest.mark.cli
def test_graphs_from_other_weights_are_refused(exported, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(exported, mixed)
    _stamp(mixed / GRAPHS["step"], "0" * 64)  # as if the step graph came from another export
    with pytest.raises(ValueError, match=r"decoder_step.onnx was exported from other weights \(sha256 000000000000\)"):
        Captioner.from_pretrained(mixed, backend="onnx")


@pytest.mark.slow
@pytest.mark.cli
def test_wrong_backend_and_missing_onnxruntime_say_what_to_do(model_dir, exported, monkeypatch):
    found = Captioner.from_pretrained(exported)  # graphs and no PyTorch weights: the onnx backend, unasked
    assert type(found.decoder).__name__ == "OnnxDecoder"
    assert len({f.stat().st_mode & 0o777 for f in exported.iterdir() if f.is_file()}) == 1  # no file left 0600
    with pytest.raises(ValueError, match="holds no ONNX graphs"):
        Captioner.from_pretrained(model_dir, backend="onnx")
    with pytest.raises(ValueError, match="backend must be one of torch, onnx"):
        Captioner.from_pretrained(model_dir, backend="tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        Captioner.from_pretrained(exported, backend="onnx", device="cuda")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it gives
    with pytest.raises(ImportError, match=re.escape(install_hint("onnx"))):
        require_onnxruntime()


@pytest.mark.slow
@pytest.mark.cli
def test_int8_decoder_loads_and_captions_from_the_command_line(model_dir, exported, tmp_path):
    out = tmp_path / "int8"
    shutil.copytree(exported, out)
    reference = Captioner.from_pretrained(model_dir, device="cpu")
    agreement = quantize_decoder(out, reference, [Image.open(p) for p in PHOTOS[:2]], log=lambda s: None)
    meta = json.loads((out / "model.json").read_text())["onnx"]
    assert meta["quantized"] == ["init", "step"] and meta["check_int8"]["images"] == agreement.images == 2
    step = onnx.load(str(out / GRAPHS["step"]))
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {node.op_type for node in step.graph.node}
    assert (out / GRAPHS["step"]).stat().st_size < (exported / GRAPHS["step"]).stat().st_size
    assert (out / GRAPHS["encoder"]).read_bytes() == (exported / GRAPHS["encoder"]).read_bytes()

    result = run_cli("caption", *map(str, PHOTOS[:2]), "--model", str(out), "--backend", "onnx", "--json")
    assert result.returncode == 0, result.stderr
    captions = json.loads(result.stdout)
    assert [Path(c["file"]).name for c in captions] == [p.name for p in PHOTOS[:2]]
    assert all(set(c["captions"][0]["generated_text"].split()) <= set(WORDS) for c in captions)

    result = run_cli("caption", str(PHOTOS[0]), "--model", str(model_dir), "--backend", "onnx")
    assert result.returncode == 2 and "holds no ONNX graphs" in result.stderr


def test_a_retrieval_decoder_exports_with_its_memory_and_searches_alike(tmp_path):
    """The init graph takes the retrieved captions as a second input; beam search over the graphs reading them
    gives PyTorch's captions, and the copy path's scatter keeps a dynamic batch."""
    from captioner.decoder_args import RetrievalArgs

    torch.manual_seed(0)
    cfg = Config(decoder="retrieval", **{k: v for k, v in TINY.items() if k in {f.name for f in fields(RetrievalArgs)}},
                 neighbours=2, memory_length=3, memory_dim=8)
    decoder = decoder_from_config(cfg, 30, 8).eval()
    with torch.no_grad():
        decoder.generate_gate.bias.fill_(-1.0)  # the copy path carries real weight
    memory = torch.randint(0, 30, (5, 6), generator=torch.Generator().manual_seed(1))
    info = export_decoder(decoder, torch.randn(5, 49, 8), 30, tmp_path, "0" * 64, memory)
    runtime = OnnxDecoder(open_session(tmp_path / GRAPHS["init"], None), open_session(tmp_path / GRAPHS["step"], None),
                          info["state"], info["step_outputs"], decoder.args)
    assert runtime.reads_memory
    features, rows = torch.randn(3, 49, 8), memory[[4, 0, 2]]
    opts = DecodingOptions(beam_size=4, max_length=12, num_captions=2)
    with torch.inference_mode():
        ours = beam_search(decoder.reading(rows), features, opts)
        theirs = beam_search(runtime.reading(rows), features, opts)
        blind = beam_search(runtime, features, opts)  # nothing retrieved: the learned slot alone
    assert [[c.tokens for c in r] for r in ours] == [[c.tokens for c in r] for r in theirs]
    assert max(abs(a.logprob - b.logprob) for r, o in zip(ours, theirs) for a, b in zip(r, o)) <= TOLERANCE
    seen = beam_search(decoder, features, opts)
    assert [[c.tokens for c in r] for r in blind] == [[c.tokens for c in r] for r in seen]
