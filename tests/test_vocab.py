import shutil

import pytest

from captioner.vocab import Vocab, tokenize

CAPTIONS = [
    "A black dog 's running on the grass .",
    "The dog isn't running; it's jumping!",
    "Two men in black-and-white shirts , one holding a ball",
    "A girl in a pink dress .",
]


def test_tokenize_follows_ptb_rules():
    assert tokenize("A black dog 's running on the grass .") == "a black dog 's running on the grass".split()
    assert tokenize("The dog isn't running; it's jumping!") == "the dog is n't running it 's jumping".split()
    assert tokenize("black-and-white  shirts,one") == ["black-and-white", "shirts", "one"]
    assert tokenize("blue & black") == ["blue", "&", "black"]
    assert tokenize("  ") == []


@pytest.mark.skipif(shutil.which("java") is None, reason="coco-caption's PTB tokenizer needs Java")
def test_tokenize_matches_coco_caption_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # Brackets differ on purpose: coco-caption keeps them as "-lrb-"/"-rrb-" (its filter compares against
    # upper case after lower-casing); a caption model has no use for such words, so we drop them.
    captions = CAPTIONS + ["A man 's shirt , a woman's hat and a \"dog\" ...", "Kids' toys - lots of them ?"]
    ref = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    for i, caption in enumerate(captions):
        assert " ".join(tokenize(caption)) == ref[i][0], caption


def test_build_counts_min_count_and_specials():
    vocab = Vocab.build(["a dog runs", "a dog sits", "a cat"], min_count=2)
    assert vocab.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert vocab.itos[4:] == ["a", "dog"]  # by count, then alphabetically; cat/runs/sits are rare


def test_encode_decode_round_trip(tmp_path):
    vocab = Vocab.build(CAPTIONS, min_count=1, max_length=50)
    for caption in CAPTIONS:
        ids = vocab.encode(caption)
        assert ids[0] == vocab.start and ids[-1] == vocab.end
        assert vocab.decode(ids) == " ".join(tokenize(caption))
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocab.load(tmp_path / "vocab.json")
    assert loaded.itos == vocab.itos and loaded.max_length == 50
    assert loaded.encode(CAPTIONS[0]) == vocab.encode(CAPTIONS[0])


def test_unknown_words_and_max_length():
    vocab = Vocab.build(["a dog"], min_count=1, max_length=3)
    ids = vocab.encode("a zebra dog dog dog")
    assert ids == [vocab.start, vocab.stoi["a"], vocab.unk, vocab.stoi["dog"], vocab.end]
    assert vocab.decode(ids) == "a <unk> dog"
    assert vocab.decode([vocab.start, vocab.stoi["a"], vocab.end, vocab.stoi["dog"]]) == "a"


def test_load_rejects_other_json(tmp_path):
    (tmp_path / "v.json").write_text('{"itos": ["x"], "min_count": 1, "max_length": 5}')
    with pytest.raises(ValueError, match="v.json"):
        Vocab.load(tmp_path / "v.json")
