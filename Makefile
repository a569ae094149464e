# The two Quickstart commands: `make demo` (the embedded default task end to end) and `make test`.
# Each sets up .venv on first use (the CPU torch wheel first, then the project) and is idempotent.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.braid-installed

.PHONY: demo test test-quick venv clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) launch/finetune.py

test: $(STAMP)
	$(PY) -m pytest -q tests

# Everything but the multi-process tests marked slow (and the GPU tests, which skip without CUDA anyway).
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" tests

clean-venv:
	rm -rf $(VENV)
