"""A missing extra's error gives the command that installs it the way this copy was installed: no
distribution named captioner is published, so `pip install 'captioner[onnx]'` would install nothing."""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from captioner import cli, extras
from captioner.extras import extra_requirements, install_hint

from helpers import ROOT


def test_in_a_checkout_the_hint_is_the_venvs_pip_on_the_checkout(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    hint = install_hint("onnx")
    assert re.fullmatch(r"\S*pip install -e '\.\[onnx\]'", hint), hint
    if Path(sys.prefix).resolve() == ROOT / ".venv":  # the checkout's own venv: as the README installs
        assert hint == ".venv/bin/pip install -e '.[onnx]'"
    monkeypatch.chdir(tmp_path)  # elsewhere: the checkout by its absolute path
    assert install_hint("onnx").endswith(f" install -e '{ROOT}[onnx]'")


def test_an_installed_copy_names_the_extras_packages(monkeypatch, tmp_path):
    monkeypatch.setattr(extras, "CHECKOUT", tmp_path)  # no pyproject.toml beside the package
    monkeypatch.setattr(metadata, "requires", lambda name: ["torch>=2.1", 'onnx>=1.16; extra == "onnx"',
                                                            'onnxruntime>=1.18; extra == "onnx"',
                                                            'pyexiv2>=2.16; extra == "metadata"'])
    assert extra_requirements("onnx") == ["onnx>=1.16", "onnxruntime>=1.18"]
    hint = install_hint("onnx")
    assert hint.endswith(" install 'onnx>=1.16' 'onnxruntime>=1.18'") and "captioner" not in hint


def test_captioner_serve_without_the_serve_extra_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what an environment without it gives
    assert cli.main(["serve"]) == 2
    assert f"captioner serve: error: captioner serve needs uvicorn: {install_hint('serve')}" in capsys.readouterr().err


def test_no_message_names_the_unpublished_distribution():
    named = [path.name for path in (ROOT / "captioner").rglob("*.py")
             if path.name != "extras.py" and "captioner[" in path.read_text()]  # extras.py says why not
    assert not named
