# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench bench-peers clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and alone, only when missing: an exact version lets pip take a local CPU wheel
	# (pip's find-links) instead of the newest CUDA build; override with `make TORCH_SPEC=... test`.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[serve,export,dev,distributed]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/aeflow demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

# The quick speed table (EfficientNet-Lite0, 128 px); benchmarks/ holds the others, each with its command.
bench: $(STAMP)
	$(PY) benchmarks/speed.py --backbone efficientnet_lite0 --size 128

# aeflow against anomalib 2.7 on this machine (benchmarks/vs_anomalib.py): a separate venv, since anomalib pins its own
# stack; never part of `make test`. Writes docs/results/vs_anomalib.md; pass options with PEERS_ARGS="--sizes 64".
PEERS_VENV := .venv-peers
PEERS_PY   := $(PEERS_VENV)/bin/python
PEERS_ARGS ?=

# Created when missing; each step runs only when its import fails, so an existing .venv-peers is used as it is.
$(PEERS_VENV)/.installed:
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -c "import torch, torchvision" 2>/dev/null || $(PEERS_PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PEERS_PY) -c "import anomalib" 2>/dev/null || $(PEERS_PY) -m pip install -q anomalib==2.7.0
	$(PEERS_PY) -c "import aeflow" 2>/dev/null || $(PEERS_PY) -m pip install -q -e .
	$(PEERS_PY) -c "import onnxruntime" 2>/dev/null || $(PEERS_PY) -m pip install -q "onnx>=1.15" "onnxruntime>=1.17"
	touch $(PEERS_VENV)/.installed

bench-peers: $(PEERS_VENV)/.installed
	$(PEERS_PY) benchmarks/vs_anomalib.py $(PEERS_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
