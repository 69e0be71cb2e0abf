# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache
