"""The decoder seam: every registered family against the same contract, and the model folder format."""
from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from captioner.config import Config
from captioner.models import (
    DECODERS,
    CaptionDecoder,
    LoadedModel,
    decoder_class,
    decoder_from_config,
    load_model,
    register_decoder,
    save_model,
)
from captioner.vocab import Vocab

from helpers import random_concepts

SHIPPED = Path(__file__).resolve().parent.parent / "captioner" / "models" / "flickr8k-lite0"
SMALL = dict(context_dim=16, embed_dim=16, attention_dim=16, hidden_dim=16, dropout=0.3, model_dim=16,
             transformer_heads=2, transformer_layers=2, encoder_layers=1, ff_dim=32)


# Every family, and the options that change what the seam sees: several attention heads, hard
# attention's one-region decoding (its default, the expectation, is the family's own entry).
VARIANTS = {**{family: (family, {}) for family in DECODERS}, "attention-2-heads": ("attention", {"attention_heads": 2}),
            "hard-attention-argmax-2-heads": ("hard-attention", {"hard_decode": "argmax", "attention_heads": 2}),
            "attention-concept-input": ("attention-concepts", {"concept_input": True}),
            "attention-concept-copy": ("attention-concepts", {"concept_copy": True})}


def small_decoder(family: str, vocab_size: int = 20, feature_dim: int = 8, seed: int = 0, **args) -> CaptionDecoder:
    """A tiny decoder of the family, its arguments the small values of SMALL where it has them, then `args`."""
    torch.manual_seed(seed)
    names = {f.name for f in fields(decoder_class(family).Args)}
    cfg = Config(decoder=family, **{**{k: v for k, v in SMALL.items() if k in names}, **args})
    decoder = decoder_from_config(cfg, vocab_size, feature_dim)
    return random_concepts(decoder, seed) if cfg.concept_input or cfg.concept_copy else decoder


def captions_batch(vocab_size: int = 20,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of 3 images and 5 captions of lengths 7..3 (sorted, as training feeds them)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 6, 5, 4, 3])
    captions = torch.zeros(5, 7, dtype=torch.long)
    for j, n in enumerate(lengths.tolist()):
        captions[j, 0], captions[j, n - 1] = 1, 2
        captions[j, 1:n - 1] = torch.randint(4, vocab_size, (n - 2,), generator=g)
    owner = torch.tensor([0, 2, 1, 0, 2])
    return torch.randn(3, 9, 8, generator=g), captions, lengths, owner  # a 3 x 3 grid


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_teacher_forcing_and_step_by_step_decoding_agree(variant):
    """The test a new family most needs: the training pass and decoding see the same model."""
    family, args = VARIANTS[variant]
    decoder = small_decoder(family, **args).eval()
    features, captions, lengths, owner = captions_batch()
    with torch.no_grad():
        out = decoder(features, captions, lengths, image_index=owner)
        teacher = F.log_softmax(out.logits, dim=-1)
        state = decoder.init_state(features[owner])
        stepped, targets = [], []
        for t in range(int(lengths[0]) - 1):
            n = int((lengths - 1 > t).sum())  # captions still going at step t, step-major like forward
            logprobs, state, _ = decoder.step(captions[:, t], state)
            stepped.append(logprobs[:n])
            targets.append(captions[:n, t + 1])
    assert torch.equal(out.targets, torch.cat(targets))
    torch.testing.assert_close(teacher, torch.cat(stepped), atol=1e-5, rtol=1e-5)
    assert out.aux_loss.dim() == 0 and bool(out.aux_loss.isfinite())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_family_saves_and_loads_to_the_same_outputs(variant, tmp_path):
    family, args = VARIANTS[variant]
    decoder = small_decoder(family, **args).eval()
    vocab = Vocab([f"w{i}" for i in range(16)])
    spec = {"encoder": "efficientnet_lite0", "channels": 8, "image_size": 224, "layer": "head"}
    decoding = {"beam_size": 4, "max_length": 12, "length_penalty": 0.5, "block_trigrams": True, "concepts": False,
                "concept_threshold": 0.3, "retrieval": True, "retrieved": 4, "retrieval_concepts": 0.3,
                "consensus": False, "concept_check": True, "decoder_lean": 0.1, "unfamiliar_threshold": 0.9}
    save_model(tmp_path / "m", decoder, vocab, spec, decoding)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["version"] == 2 and meta["decoder"]["family"] == family and "config" not in meta
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, LoadedModel) and type(loaded.decoder) is type(decoder)
    assert loaded.decoder.arguments() == decoder.arguments()
    assert loaded.decoding == decoding and loaded.vocab.itos == vocab.itos and loaded.encoder_spec == spec
    features, captions, lengths, owner = captions_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.decoder(features, captions, lengths, owner).logits,
                                   decoder(features, captions, lengths, owner).logits)


def test_export_average_writes_the_mean_of_the_weights_and_refuses_models_that_differ(tmp_path, capsys):
    from captioner.cli import main

    vocab = Vocab([f"w{i}" for i in range(16)])
    spec = {"encoder": "efficientnet_lite0", "channels": 8, "image_size": 224, "layer": "head"}
    decoding = {"beam_size": 3, "max_length": 12, "length_penalty": 0.0, "block_trigrams": False}
    decoders = [small_decoder("attention", seed=seed) for seed in (1, 2, 3)]
    for i, decoder in enumerate(decoders):
        save_model(tmp_path / f"m{i}", decoder, vocab, spec, decoding)
    assert main(["export", str(tmp_path / "m0"), str(tmp_path / "mean"), "--dtype", "float32",
                 "--average", str(tmp_path / "m1"), str(tmp_path / "m2")]) == 0
    mean = load_model(tmp_path / "mean").decoder.state_dict()
    for key in decoders[0].state_dict():
        expected = sum(d.state_dict()[key] for d in decoders) / 3
        torch.testing.assert_close(mean[key], expected)
    save_model(tmp_path / "wide", small_decoder("mean"), vocab, spec, decoding)  # another family
    save_model(tmp_path / "other", decoders[1], Vocab([f"v{i}" for i in range(16)]), spec, decoding)
    for name, what in (("wide", "decoder"), ("other", "vocabulary")):
        assert main(["export", str(tmp_path / "m0"), str(tmp_path / "x"), "--average", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"cannot average {tmp_path / 'm0'} and {tmp_path / name}: their {what} differs" in err
    assert not (tmp_path / "x").exists()


def test_export_sets_the_decoding_defaults_it_is_given_and_keeps_the_rest(tmp_path, capsys):
    from captioner.cli import main

    decoder = small_decoder("attention")
    vocab = Vocab([f"w{i}" for i in range(16)])
    spec = {"encoder": "efficientnet_lite0", "channels": 8, "image_size": 224, "layer": "head"}
    save_model(tmp_path / "m", decoder, vocab, spec,
               {"beam_size": 3, "max_length": 12, "length_penalty": 0.0, "block_trigrams": False})
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "tuned"), "--length-penalty", "0.5",
                 "--block-trigrams"]) == 0
    # options the caller left out (concepts, newer than this model file) take their defaults
    assert load_model(tmp_path / "tuned").decoding == {"beam_size": 3, "max_length": 12, "length_penalty": 0.5,
                                                       "block_trigrams": True, "concepts": True,
                                                       "concept_threshold": 0.3, "retrieval": True, "retrieved": 4,
                                                       "retrieval_concepts": 0.3, "consensus": False,
                                                       "concept_check": True, "decoder_lean": 0.1,
                                                       "unfamiliar_threshold": 0.9}
    assert "length_penalty 0.5, block_trigrams True" in capsys.readouterr().out
    assert load_model(tmp_path / "tuned").fit == "crop"  # kept, as the decoding defaults not given are
    assert main(["export", str(tmp_path / "tuned"), str(tmp_path / "squashing"), "--fit", "squash"]) == 0
    assert load_model(tmp_path / "squashing").fit == "squash"
    assert load_model(tmp_path / "squashing").decoding == load_model(tmp_path / "tuned").decoding
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "bad"), "--beam-size", "0"]) == 2
    assert "beam_size must be an integer from 1 to 20, got 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit, match="--format onnx keeps the model's decoding defaults"):
        main(["export", str(tmp_path / "m"), str(tmp_path / "onnx"), "--format", "onnx", "--beam-size", "5"])
    with pytest.raises(SystemExit, match="--format onnx keeps the model's decoding defaults and fit"):
        main(["export", str(tmp_path / "m"), str(tmp_path / "onnx"), "--format", "onnx", "--fit", "squash"])


def test_registry_refuses_a_second_family_of_the_same_name_and_names_the_known_ones():
    with pytest.raises(ValueError, match="registered twice"):
        register_decoder("attention")(type("Other", (CaptionDecoder,), {}))
    with pytest.raises(ValueError, match=r"unknown decoder family 'lstm'; known: attention, attention-concepts, "
                                         r"hard-attention, mean"):
        decoder_class("lstm")


def test_the_shipped_model_is_format_2_without_training_paths():
    meta = json.loads((SHIPPED / "model.json").read_text())
    assert meta["version"] == 2 and set(meta) == {"format", "version", "decoder", "encoder", "fit",
                                                  "fine_tuned_encoder", "vocab", "decoding"}
    assert "prepared" not in json.dumps(meta) and "runs/" not in json.dumps(meta)


def version_1(folder: Path, tmp_path: Path) -> Path:
    """The shipped model as captioner 0.1 wrote it: the whole training config in model.json."""
    old = tmp_path / "v1"
    shutil.copytree(folder, old)
    meta = json.loads((old / "model.json").read_text())
    config = {**Config().to_dict(), **meta["decoder"]["args"], **meta["decoding"], "decoder": meta["decoder"]["family"],
              "prepared": "/home/someone/prepared", "a_training_option_renamed_since": 1}
    (old / "model.json").write_text(json.dumps({"format": "captioner", "version": 1, "config": config,
                                                "encoder": meta["encoder"], "fine_tuned_encoder": False}))
    return old


def test_a_folder_says_how_its_model_meets_a_photo_that_is_not_square(tmp_path):
    older = tmp_path / "older"
    shutil.copytree(SHIPPED, older, ignore=shutil.ignore_patterns("datastore"))
    meta = json.loads((older / "model.json").read_text())
    assert meta.pop("fit") == "squash"  # the shipped model learned from Flickr8k's photos squashed to squares
    (older / "model.json").write_text(json.dumps(meta))
    assert load_model(older).fit == "crop" and load_model(older).encoder().fit == "crop"  # written before fit: crops
    assert load_model(SHIPPED).encoder().fit == "squash"
    (older / "model.json").write_text(json.dumps({**meta, "fit": "stretch"}))
    with pytest.raises(ValueError, match=r"older/model.json: fit must be one of crop, squash, got 'stretch'"):
        load_model(older)


def test_version_1_model_folders_still_load_the_same_model(tmp_path):
    new, old = load_model(SHIPPED), load_model(version_1(SHIPPED, tmp_path))
    assert old.decoding == new.decoding and old.decoder.arguments() == new.decoder.arguments()
    for key, value in new.decoder.state_dict().items():
        assert torch.equal(value, old.decoder.state_dict()[key]), key


def test_a_transformer_saved_before_its_arguments_were_renamed_still_loads(tmp_path):
    """heads, layers and dropout were the transformer's names until they became transformer_*; a version 1
    folder stored them in its whole config, a version 2 one as the family's arguments."""
    decoder = small_decoder("transformer", transformer_dropout=0.2).eval()
    spec = {"encoder": "efficientnet_lite0", "channels": 8, "image_size": 224, "layer": "head"}
    save_model(tmp_path / "m", decoder, Vocab([f"w{i}" for i in range(16)]), spec, {})
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    old_names = {"transformer_heads": "heads", "transformer_layers": "layers", "transformer_dropout": "dropout"}
    meta["decoder"]["args"] = {old_names.get(k, k): v for k, v in meta["decoder"]["args"].items()}
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    assert load_model(tmp_path / "m").decoder.arguments() == decoder.arguments()
    old = version_1(tmp_path / "m", tmp_path)
    meta = json.loads((old / "model.json").read_text())
    for name in old_names:  # captioner 0.1's config had only the old names
        del meta["config"][name]
    (old / "model.json").write_text(json.dumps(meta))
    assert load_model(old).decoder.arguments() == decoder.arguments()


def test_a_concept_model_saved_as_an_attention_one_loads_as_attention_concepts(tmp_path):
    """Models saved before LSTM-A and LSTM-C became a family are of family attention with the options on, and
    every LSTM family stored them off: both load, as attention-concepts and as their own family."""
    decoder = random_concepts(small_decoder("attention-concepts", concept_copy=True)).eval()
    spec = {"encoder": "efficientnet_lite0", "channels": 8, "image_size": 224, "layer": "head"}
    for family, model in (("attention-concepts", decoder), ("hard-attention", small_decoder("hard-attention"))):
        folder = tmp_path / family
        save_model(folder, model, Vocab([f"w{i}" for i in range(16)]), spec, {})
        meta = json.loads((folder / "model.json").read_text())
        meta["decoder"] = {"family": family.removesuffix("-concepts"),
                           "args": {"concept_input": False, "concept_copy": False, **meta["decoder"]["args"]}}
        (folder / "model.json").write_text(json.dumps(meta))
        loaded = load_model(folder).decoder
        assert (loaded.family, loaded.arguments()) == (family, model.arguments())
    for key, value in decoder.state_dict().items():
        assert torch.equal(value, load_model(tmp_path / "attention-concepts").decoder.state_dict()[key]), key


def test_newer_versions_unknown_families_and_arguments_are_refused_by_name(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(SHIPPED, folder)
    meta = json.loads((folder / "model.json").read_text())

    def write(**changes) -> None:
        (folder / "model.json").write_text(json.dumps({**meta, **changes}))

    write(version=3)
    with pytest.raises(ValueError, match="version 3 is newer than this captioner reads"):
        load_model(folder)
    write(decoder={"family": "retnet", "args": {}})
    with pytest.raises(ValueError, match="unknown decoder family 'retnet'"):
        load_model(folder)
    write(decoder={"family": "attention", "args": {**meta["decoder"]["args"], "heads": 8}})
    with pytest.raises(ValueError, match=r"model.json: decoder 'attention' has no argument\(s\) .*\bheads\b"):
        load_model(folder)
    write(format="something-else")
    with pytest.raises(ValueError, match="not a captioner model file"):
        load_model(folder)


def test_inference_refuses_an_encoder_that_differs_from_the_saved_spec(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(SHIPPED, folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["encoder"]["preprocess"] = "rgb,imagenet-mean-std,center-crop-224"
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"other encoder features: preprocess 'rgb,imagenet-mean-std"):
        load_model(folder).encoder()


def test_the_transformer_key_value_cache_gives_the_same_captions_as_rerunning_the_prefix():
    from captioner.decoding import beam_search
    from captioner.decoding_options import DecodingOptions

    decoder = small_decoder("transformer", seed=3).eval()
    with torch.no_grad():
        decoder.out.bias.add_(torch.linspace(-2, 2, 20))  # a spread of word probabilities, so captions differ
    features = captions_batch()[0]
    options = DecodingOptions(beam_size=3, max_length=9, num_captions=2, block_trigrams=True, length_penalty=0.7)
    cached = beam_search(decoder, features, options)
    decoder.kv_cache = False
    rerun = beam_search(decoder, features, options)
    for mine, theirs in zip(cached, rerun):
        assert [c.tokens for c in mine] == [c.tokens for c in theirs]
        for a, b in zip(mine, theirs):
            assert abs(a.logprob - b.logprob) < 1e-4
            torch.testing.assert_close(a.alphas, b.alphas, atol=1e-5, rtol=1e-5)
    best = cached[0][0]
    assert best.alphas.shape == (len(best.tokens), 9)
    torch.testing.assert_close(best.alphas.sum(dim=1), torch.ones(len(best.tokens)))


def test_the_cache_grows_by_one_position_a_step_and_the_regions_are_computed_once():
    decoder = small_decoder("transformer").eval()
    features = captions_batch()[0]
    with torch.no_grad():
        state = decoder.init_state(features)
        memory = state["memory_k0"]
        for t in range(3):
            _, state, _ = decoder.step(torch.full((3,), 1), state)
            assert state["self_k1"].shape == (3, 2, t + 1, 8)
        assert state["memory_k0"] is memory  # beam search never reorders what does not change


def test_the_reinforce_estimator_is_unbiased():
    """Categorical over 4 regions with fixed rewards: the mean of N one-draw estimates of d E[r] / d logits,
    through the shared draw and surrogate with a baseline, is the analytic p_k (r_k - E[r]) within 5
    standard errors, taken from the estimator's exact variance: g = (r_s - b)(onehot(s) - p)."""
    from captioner.reinforce import draw, surrogate

    torch.manual_seed(0)
    logits = torch.tensor([0.5, -1.0, 1.5, 0.0], requires_grad=True)
    rewards, b, n = torch.tensor([1.0, 3.0, -2.0, 0.5]), 0.7, 20000
    p = torch.softmax(logits, 0).detach()
    expected = p * (rewards - (p * rewards).sum())
    second_moment = (p[:, None] * (rewards - b)[:, None] ** 2 * (torch.eye(4) - p) ** 2).sum(0)
    tolerance = 5 * ((second_moment - expected ** 2) / n).sqrt()

    def estimate(baseline: torch.Tensor | float) -> torch.Tensor:
        s = draw(torch.softmax(logits, 0).detach().expand(n, -1))
        loss = surrogate(torch.log_softmax(logits, 0)[s],
                         rewards[s] - (baseline(s) if callable(baseline) else baseline))
        return -torch.autograd.grad(loss.mean(), logits)[0]

    assert ((estimate(b) - expected).abs() < tolerance).all()
    # the check has the power to fail: a baseline that depends on the draw (half its reward) biases it
    assert not ((estimate(lambda s: rewards[s] / 2) - expected).abs() < tolerance).all()


def hard_decoder(**args) -> CaptionDecoder:
    return small_decoder("hard-attention", **{"dropout": 0.0, **args}).train()


def test_hard_attention_training_draws_regions_and_gets_the_reinforce_gradient():
    features, captions, lengths, owner = captions_batch()
    # all drawn, no penalty and no entropy: the attention's only gradient is REINFORCE's
    decoder = hard_decoder(expectation_probability=0.0, alpha_c=0.0, entropy_weight=0.0)
    out = decoder(features, captions, lengths, owner)
    decoder.zero_grad()
    out.aux_loss.backward()
    assert decoder.att_score.weight.grad.abs().sum() > 0 and decoder.att_feat.weight.grad.abs().sum() > 0
    assert decoder.out.weight.grad is None or decoder.out.weight.grad.abs().sum() == 0  # words: cross-entropy's
    assert float(decoder.baseline_weight) == pytest.approx(0.1)
    b = decoder.baseline_sum / decoder.baseline_weight  # the mean log p(y|s) of the batch: the words' log-probs
    assert float(b) == pytest.approx(-F.cross_entropy(out.logits, out.targets, reduction="sum").item() / 5, rel=1e-5)
    # a draw is one region per word, not the expectation: other logits than the expectation's pass
    with torch.no_grad():
        soft = hard_decoder(expectation_probability=1.0, alpha_c=0.0)(features, captions, lengths, owner)
        drawn = hard_decoder(expectation_probability=0.0, alpha_c=0.0)(features, captions, lengths, owner)
        decoding = hard_decoder().eval()(features, captions, lengths, owner)
    torch.testing.assert_close(soft.logits, decoding.logits)  # expectation in training = the decoding pass
    assert not torch.allclose(drawn.logits, decoding.logits, atol=1e-3)
    assert float(soft.aux_loss) < 0  # just the entropy bonus: no REINFORCE term where nothing was drawn


def test_step_major_values_are_summed_per_caption():
    from captioner.models.hard_attention import per_caption

    steps = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0]), torch.tensor([100.0])]
    assert per_caption(steps).tolist() == [111.0, 22.0, 3.0]


def test_hard_attention_baseline_is_saved_and_argmax_shows_one_region_per_word(tmp_path):
    decoder = hard_decoder(hard_decode="argmax")
    features, captions, lengths, owner = captions_batch()
    decoder(features, captions, lengths, owner)
    vocab = Vocab([f"w{i}" for i in range(16)])
    spec = {"encoder": "efficientnet_lite0", "channels": 8, "image_size": 224, "layer": "head"}
    save_model(tmp_path / "m", decoder, vocab, spec, {"beam_size": 2, "max_length": 5})
    loaded = load_model(tmp_path / "m").decoder
    assert float(loaded.baseline_weight) == pytest.approx(0.1)
    assert torch.equal(loaded.baseline_sum, decoder.baseline_sum)
    with torch.no_grad():
        _, _, alpha = loaded.step(torch.ones(3, dtype=torch.long), loaded.init_state(features))
    assert set(alpha.flatten().tolist()) == {0.0, 1.0} and torch.equal(alpha.sum(dim=1), torch.ones(3))


def test_attention_heads_concatenate_their_contexts_and_show_their_mean():
    decoder = small_decoder("attention", attention_heads=2).eval()
    one = small_decoder("attention")
    assert decoder.lstm_step.in_features == 2 * 16 + 16 and one.lstm_step.in_features == 16 + 16
    assert decoder.att_score.weight.shape == one.att_score.weight.shape  # the heads split one score vector
    with torch.no_grad():
        state = decoder.init_state(captions_batch()[0])
        heads = decoder._distributions(state, state["h"])
        _, _, alpha = decoder.step(torch.ones(3, dtype=torch.long), state)
    assert heads.shape == (3, 2, 9) and not torch.allclose(heads[:, 0], heads[:, 1])
    torch.testing.assert_close(alpha, heads.mean(dim=1))  # the word's attention is read from the previous h
    with pytest.raises(ValueError, match=r"attention_dim \(16\) must be a multiple of attention_heads \(3\)"):
        small_decoder("attention", attention_heads=3)
