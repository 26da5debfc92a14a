# rmexp: `make help` lists the targets. Every target installs what it needs into .venv first.
PY      := .venv/bin/python
STAMP   := .venv/.installed
ARGS    ?=

.DEFAULT_GOAL := help
.PHONY: help install train sweep report compare serve bench bench-quality bench-serve bench-data gpu-check test test-fast lint clean

help: ## list the targets
	@grep -hE '^[a-z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, at the tested version: the CPU build from local disk here, instead of a multi-GB CUDA wheel
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[serve,sweep,dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv with the tested set (constraints.txt), every extra, rmexp in editable mode

train: $(STAMP) ## train the embedded default (4-bit gemma3_270m on data/preference.jsonl); ARGS= adds overrides
	$(PY) -m rmexp.train $(ARGS)

SWEEP_DIR ?= outputs/multirun/make-sweep
sweep: $(STAMP) ## a small CPU sweep end to end (tiny model, lora.r x learning rate), then its report
	rm -rf $(SWEEP_DIR)
	$(PY) -m rmexp.train -m model=tiny lora.r=4,8 trainer.learning_rate=1e-4,1e-3 trainer.max_steps=10 \
		trainer.eval_steps=5 logger.mode=offline hydra.sweep.dir=$(SWEEP_DIR) $(ARGS)
	$(PY) -m rmexp.report sweep_dir=$(SWEEP_DIR)

report: $(STAMP) ## summarise a sweep: make report SWEEP_DIR=outputs/multirun/<date>/<time>
	$(PY) -m rmexp.report sweep_dir=$(SWEEP_DIR)

compare: $(STAMP) ## two runs pair by pair (gap, paired-bootstrap interval, McNemar p; per source): make compare A=<run or eval dir> B=<dir>
	$(PY) -m rmexp.compare a=$(A) b=$(B) $(ARGS)

serve: $(STAMP) ## HTTP reward server on 127.0.0.1:5000: make serve CHECKPOINT=outputs/runs/<date>/<time>; ARGS= adds overrides
	$(PY) -m rmexp.serve checkpoint=$(CHECKPOINT) $(ARGS)

BENCH_DATA ?= ../shared/data/hh-rlhf-harmless/pairs.jsonl
bench: $(STAMP) ## training throughput, packed vs TRL (gemma3_270m, 96 HH-RLHF pairs, batch 8)
	$(PY) bench/throughput.py --model gemma3_270m --data $(BENCH_DATA) --pairs 96 --batch 8 $(ARGS)

bench-quality: $(STAMP) ## quality vs the seed recipe at equal wall time (gemma3_270m, HH-RLHF 1200 train / 400 held out)
	$(PY) bench/quality.py --data $(BENCH_DATA) $(ARGS)

bench-serve: $(STAMP) ## reward server under 16 concurrent clients vs in-process scoring: make bench-serve CHECKPOINT=<run dir>
	$(PY) bench/serve.py --checkpoint $(CHECKPOINT) --data $(BENCH_DATA) --clients 16 $(ARGS)

PAIRS ?= 1000000
bench-data: $(STAMP) ## data pipeline: load+validate+tokenize PAIRS synthetic pairs, in-memory vs datasets (num_proc 2) and its cache
	$(PY) bench/data.py --pairs $(PAIRS) $(ARGS)

gpu-check: $(STAMP) ## one CUDA GPU, under 8 minutes, no hub: placement, 4-bit layers, rewards, flex, training, export, pytest -m cuda; one JSON report
	$(PY) bench/gpu_check.py --device cuda $(ARGS)

# JOBS pytest-xdist workers share the cores, each with OMP_NUM_THREADS threads (1 unless set): most tests
# wait on a process importing torch, one thread apiece. JOBS=1 runs in one process (the numerics at 2 threads).
JOBS ?= 2
test: $(STAMP) ## run the whole test suite (CPU, tiny model; what CI runs) in JOBS=2 workers of one thread each
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q $(if $(filter-out 1,$(JOBS)),-n $(JOBS)) $(ARGS)

test-fast: $(STAMP) ## the quick tests only (-m "not slow", under two minutes)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP) ## ruff over src, tests and bench
	$(PY) -m ruff check src tests bench

clean: ## remove outputs, caches and .venv (keeps the model cache in ~/.cache/rmexp)
	rm -rf .venv outputs/runs outputs/multirun .pytest_cache .ruff_cache .hypothesis build *.egg-info src/*.egg-info
