# The two commands a newcomer needs: `make demo` and `make test`. Both bootstrap .venv.
SHELL := /bin/bash
PY := .venv/bin/python
SETUP_STAMP := .venv/.setup-done
SAMPLE ?= data/sample
SRC ?= $(SAMPLE)
OUT ?= data/shards
SHARDS ?= data/shards
REPORT ?= bench/pipeline.json
ARGS ?=

.PHONY: setup sample-data shards bench-shards bench-pipeline bench-model demo test clean help

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup: ## create .venv with the pinned dependencies (Pillow-SIMD from source); idempotent
	@bash scripts/setup.sh

$(SAMPLE)/.complete: | setup
	$(PY) -m sampledata --out $(SAMPLE)

sample-data: setup ## generate the embedded ImageNet-shaped sample dataset into data/sample
	$(PY) -m sampledata --out $(SAMPLE)

shards: setup ## shard ImageNet: make shards SRC=/path/to/imagenet OUT=data/shards
	@if [ "$(SRC)" = "$(SAMPLE)" ]; then $(MAKE) --no-print-directory $(SAMPLE)/.complete; fi
	$(PY) -m shards --src $(SRC) --out $(OUT) $(ARGS)

bench-shards: setup $(SAMPLE)/.complete ## images/s of `make shards` (1 process, all cores) vs a bare decode+resize+encode loop
	$(PY) -m bench.bench_shards --src $(SAMPLE) --report bench/shards.json

demo: setup ## the main job on the sample data: sample data -> shards -> pipeline -> model
	$(MAKE) --no-print-directory shards
	$(PY) -m demo --shards $(OUT)

test: setup ## run the test suite (CPU only)
	$(PY) -m pytest -q $(ARGS)

clean: ## remove generated data and benchmark output (keeps .venv)
	rm -rf data bench/*.json bench/*.png
