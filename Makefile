# Two entry points for a fresh machine: `make demo` (the main job) and `make test`. Both are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned: a plain `pip install torch` would pull several GB of CUDA wheels.
TORCH ?= torch==2.13.0

.PHONY: setup setup-dev demo serve lint typecheck test test-fast clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PY) -m pip install -q -e ".[train,test,lite12,serve,contrastive,onnx,metadata,heif,raw]"
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

LINT := $(VENV)/bin/ruff check captioner tests scripts app.py

# ruff, configured in pyproject.toml; `make test` runs it first
lint: setup-dev
	$(LINT)

# mypy over the package, configured in pyproject.toml: the package ships py.typed, so its hints must hold
typecheck: setup-dev
	$(VENV)/bin/mypy

# the full suite, as CI runs it (.ci/run)
test: setup-dev
	$(LINT)
	$(PY) -m pytest -q

# the fast lane for the edit-test loop: all but the tests marked slow (training, the CLI in a child process)
test-fast: setup-dev
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) prepared attention

# A first training run in about two minutes on 2 CPU cores (configs/quickstart.yaml: 300 Flickr8k photos from
# ../shared/data/flickr8k, a small decoder, 4 epochs): prepare, train, evaluate on the test split, and the
# attention picture of a test photo. Run it again and it starts the run afresh on the same prepared photos.
QUICKSTART_DATA ?= ../shared/data/flickr8k
.PHONY: quickstart
quickstart: setup-dev
	rm -rf runs/quickstart
	$(VENV)/bin/captioner prepare --config configs/quickstart.yaml --data $(QUICKSTART_DATA)
	$(VENV)/bin/captioner train --config configs/quickstart.yaml
	$(VENV)/bin/captioner evaluate --model runs/quickstart/best --prepared prepared/quickstart --split test
	$(VENV)/bin/captioner caption $(QUICKSTART_DATA)/images/$$(head -1 $(QUICKSTART_DATA)/Flickr_8k.testImages.txt) \
		--model runs/quickstart/best --attention attention/quickstart
	@echo "attention picture: attention/quickstart/; scores and captions: runs/quickstart/best-eval_test/"
