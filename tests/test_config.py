import argparse
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from captioner.config import UNUSED, Config, add_config_flags, config_from_args


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return config_from_args(parser.parse_args(argv))


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nbatch_size: 16\nglove: true\nencoder: efficientnet_lite1\n")
    cfg = parse(["--config", str(path), "--batch-size", "32", "--no-glove"])
    assert cfg.lr == 0.001 and cfg.batch_size == 32 and cfg.glove is False
    assert cfg.encoder == "efficientnet_lite1"
    assert cfg.epochs == Config().epochs


def test_int_is_accepted_for_float():
    assert Config.from_dict({"lr": 1}).lr == 1.0


@pytest.mark.parametrize("text, message", [("lrr: 0.1\n", "unknown option"), ("batch_size: many\n", "batch_size"),
                                            ("- a\n- b\n", "mapping"), ("a: [\n", "not valid YAML")])
def test_bad_config_names_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        Config.load(path)
    assert "bad.yaml" in str(err.value)


def test_a_base_file_is_read_first_and_overridden(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "main.yaml").write_text("lr: 0.001\nbatch_size: 16\nepochs: 7\n")
    (tmp_path / "variant.yaml").write_text("base: recipes/main.yaml\nbatch_size: 32\n")  # relative to variant.yaml
    (tmp_path / "deeper.yaml").write_text("base: variant.yaml\nepochs: 2\n")
    cfg = Config.load(tmp_path / "deeper.yaml")
    assert (cfg.lr, cfg.batch_size, cfg.epochs) == (0.001, 32, 2)
    assert Config.load(tmp_path / "variant.yaml").epochs == 7


@pytest.mark.parametrize("files, message, named", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "lrr: 0.1\n"}, "unknown option", "b.yaml"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "batch_size: many\n"}, "batch_size", "b.yaml"),
    ({"a.yaml": "base: missing.yaml\n"}, "the base of", "missing.yaml"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "loop", "b.yaml"),
    ({"a.yaml": "base: 3\n"}, "base must be", "a.yaml"),
])
def test_a_bad_base_names_the_file_at_fault(tmp_path, files, message, named):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        Config.load(tmp_path / "a.yaml")
    assert named in str(err.value)


def test_the_variant_configs_state_only_how_they_differ_from_their_base():
    """A config in configs/ or beside the probes that use it that names a base sets nothing to the value its
    base file already sets."""
    root = Path(__file__).resolve().parents[1]
    files = sorted([*(root / "configs").glob("*.yaml"), *(root / "scripts" / "probes").glob("*.yaml")])
    variants = [p for p in files if "base" in yaml.safe_load(p.read_text())]
    assert len(variants) >= 5
    for path in variants:
        own = yaml.safe_load(path.read_text())
        base = yaml.safe_load((path.parent / own.pop("base")).read_text())
        same = sorted(k for k, v in own.items() if base.get(k, object()) == v)
        assert not same, f"{path.name} repeats its base's {', '.join(same)}"
        assert Config.load(path) != Config.load(path.parent / yaml.safe_load(path.read_text())["base"])


def test_save_load_round_trip(tmp_path):
    cfg = Config(lr=0.123, decoder="mean")
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg


@pytest.mark.parametrize("values, message", [
    ({"schedule": "cosine"}, "schedule must be one of plateau, onecycle, warmup, none, got 'cosine'"),
    ({"val_metric": "METEOR"}, "val_metric must be one of Bleu_4, CIDEr"),
    ({"beam_size": 0}, "beam_size must be from 1 to 20, got 0"),
    ({"lr": -0.1}, "lr must be at least 0"),
    ({"teacher_forcing_end": 1.5}, "teacher_forcing_end must be from 0 to 1"),
    ({"device": "gpu"}, "device must be auto, cpu, mps, cuda or cuda:N"),
    ({"epochs": True}, "epochs must be int"),
    ({"num_captions": 4, "beam_size": 3}, r"num_captions \(4\) must be at most beam_size \(3\)"),
])
def test_values_are_checked_when_the_config_is_read(tmp_path, values, message):
    path = tmp_path / "c.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    with pytest.raises(ValueError, match=message) as err:
        Config.load(path)
    assert str(err.value).startswith(str(path))
    with pytest.raises(ValueError, match=message):
        Config(**values)


def test_flags_are_checked_with_the_file_they_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_captions: 3\n")
    with pytest.raises(ValueError,
                       match=r"c.yaml with the flags given: .*num_captions \(3\) must be at most beam_size \(2\)"):
        parse(["--config", str(path), "--beam-size", "2"])
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    with pytest.raises(SystemExit):  # argparse refuses a choice outside the field's own list
        parser.parse_args(["--decoder", "gru"])


def test_every_flag_says_what_it_does_its_choices_or_range_and_default():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    text = " ".join(parser.format_help().split())
    for f in fields(Config):
        assert f.metadata["help"], f.name
        if f.name in UNUSED:  # old config files may hold it; nothing reads it, so no flag offers it
            assert f"--{f.name.replace('_', '-')}" not in text
            continue
        assert f"--{f.name.replace('_', '-')}" in text
        assert f"(default: {f.default!r})" in text, f.name
    assert "--schedule {plateau,onecycle,warmup,none}" in text
    assert "--decoder {attention,attention-concepts,hard-attention,mean,transformer,retrieval}" in text
    assert "--beam-size INT beam size; from 1 to 20 (default: 3)" in text


def test_config_fields_of_the_decoding_options_come_from_their_one_table():
    from captioner.decoding_options import LIMITS, OPTIONS

    mine = {f.name: f for f in fields(Config) if f.name in OPTIONS}
    assert set(mine) == set(OPTIONS)
    for name, f in mine.items():
        assert (f.default, f.metadata["help"], f.metadata.get("range")) == \
            (OPTIONS[name].default, OPTIONS[name].metadata["help"], LIMITS.get(name)), name


@pytest.mark.slow
@pytest.mark.cli
def test_help_does_not_import_torch():
    code = ("import sys; from captioner.cli import build_parser; p = build_parser(); "
            "[a.choices[name].format_help() for a in p._subparsers._group_actions for name in a.choices]; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_decoder_choices_are_the_registered_families():
    from captioner.models import DECODERS

    (decoder,) = [f for f in fields(Config) if f.name == "decoder"]
    assert sorted(decoder.metadata["choices"]) == sorted(DECODERS)


def test_config_fields_of_decoder_arguments_are_the_families_own():
    """Config inherits every family's Args, so an argument is declared once; two families declaring one
    name with different defaults would leave Config with only one of them."""
    from captioner.decoder_args import FAMILIES
    from captioner.models import DECODERS

    config = {f.name: f for f in fields(Config)}
    for family, cls in DECODERS.items():
        assert issubclass(Config, cls.Args) and FAMILIES[family][0] is cls.Args, family
        for arg in fields(cls.Args):
            assert (config[arg.name].default, config[arg.name].metadata) == (arg.default, arg.metadata), \
                f"{family}: {arg.name}"


def test_the_transformer_has_its_own_dropout_and_old_names_still_load(tmp_path):
    assert (Config().dropout, Config().transformer_dropout) == (0.5, 0.1)
    old = tmp_path / "old.yaml"  # a transformer config from before the rename
    old.write_text("decoder: transformer\nheads: 6\nlayers: 2\ndropout: 0.3\n")
    cfg = Config.load(old)
    assert (cfg.transformer_heads, cfg.transformer_layers, cfg.transformer_dropout, cfg.dropout) == (6, 2, 0.3, 0.5)
    lstm = tmp_path / "lstm.yaml"  # an LSTM run's config.json held the transformer's options too
    lstm.write_text("decoder: attention\nheads: 8\nlayers: 3\ndropout: 0.4\n")
    cfg = Config.load(lstm)
    assert (cfg.transformer_heads, cfg.transformer_layers, cfg.transformer_dropout, cfg.dropout) == (8, 3, 0.1, 0.4)
    assert Config.from_dict({"decoder": "transformer", "dropout": 0.2, "transformer_dropout": 0.3}).dropout == 0.2


def test_concept_options_without_a_decoder_mean_the_attention_concepts_family(tmp_path):
    """LSTM-A and LSTM-C were options of the attention LSTM before they became a family: configs and flags
    that turn them on without naming the decoder still train it; another family is refused by name."""
    probes = Path(__file__).resolve().parent.parent / "scripts" / "probes"
    for name, option in (("flickr8k-heldout-concepts.yaml", "concept_input"), ("flickr8k-heldout-copy.yaml",
                                                                                "concept_copy")):
        cfg = Config.load(probes / name)
        assert cfg.decoder == "attention-concepts" and getattr(cfg, option), name
    assert parse(["--concept-copy"]).decoder == "attention-concepts"
    assert parse([]).decoder == "attention"
    with pytest.raises(ValueError, match="concept_input is an option of the attention-concepts decoder, not of 'mean'"):
        parse(["--decoder", "mean", "--concept-input"])
