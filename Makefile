# Two entry points for a fresh machine: `make demo` (the main job) and `make test`. Both are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned: a plain `pip install torch` would pull several GB of CUDA wheels.
TORCH ?= torch==2.13.0

.PHONY: setup setup-dev demo serve test clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PY) -m pip install -q -e ".[train,test,lite12,serve,contrastive,onnx,metadata]"
	touch $@

$(VENV)/.serve: $(VENV)/.core
	$(PY) -m pip install -q -e ".[serve]"
	touch $@

setup: $(VENV)/.core

setup-dev: $(VENV)/.dev

demo: setup
	$(VENV)/bin/captioner caption examples/photos --attention attention
	@echo "attention pictures: attention/*.png"

serve: $(VENV)/.serve
	$(VENV)/bin/captioner serve

test: setup-dev
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) prepared attention
