import argparse
import subprocess
import sys
from dataclasses import fields

import pytest

from captioner.config import Config, add_config_flags, config_from_args


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
    with pytest.raises(ValueError, match=r"c.yaml with the flags given: .*num_captions \(3\) must be at most beam_size \(2\)"):
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
        assert f"--{f.name.replace('_', '-')}" in text
        assert f"(default: {f.default!r})" in text, f.name
    assert "--schedule {plateau,onecycle,warmup,none}" in text and "--decoder {attention,mean,transformer}" in text
    assert "--beam-size INT beam size; from 1 to 20 (default: 3)" in text


def test_decoding_ranges_agree_with_the_pipeline_limits():
    from captioner.pipeline import LIMITS

    ranges = {f.name: f.metadata["range"] for f in fields(Config) if f.name in LIMITS}
    assert ranges == LIMITS


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
