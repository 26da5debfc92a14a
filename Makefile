# rmexp: `make help` lists the targets. Every target installs what it needs into .venv first.
PY      := .venv/bin/python
STAMP   := .venv/.installed
ARGS    ?=

.DEFAULT_GOAL := help
.PHONY: help install train test lint clean

help: ## list the targets
	@grep -hE '^[a-z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build from local disk here, instead of a multi-GB CUDA wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv with the pinned stack (CPU torch) and rmexp in editable mode

train: $(STAMP) ## train the embedded default (4-bit gemma3_270m on data/preference.jsonl); ARGS= adds overrides
	$(PY) -m rmexp.train $(ARGS)

test: $(STAMP) ## run the test suite (CPU, tiny model)
	$(PY) -m pytest -q $(ARGS)

lint: $(STAMP) ## ruff over src, tests and bench
	$(PY) -m ruff check src tests bench

clean: ## remove outputs, caches and .venv (keeps the model cache in ~/.cache/rmexp)
	rm -rf .venv outputs/runs outputs/multirun .pytest_cache .ruff_cache .hypothesis src/*.egg-info
