import argparse

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
