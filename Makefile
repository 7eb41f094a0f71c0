# The two commands a newcomer needs: `make demo` and `make test`. Both bootstrap .venv.
SHELL := /bin/bash
PY := .venv/bin/python
SAMPLE ?= data/sample
SRC ?= $(SAMPLE)
OUT ?= data/shards
SHARDS ?= data/shards
REPORT ?= bench/pipeline.json
ARGS ?=
TRAIN_ARGS ?=
# make train-local: every variable optional, each overrides the config file.
CONFIG ?= configs/demo.toml
RUN ?= runs/$(basename $(notdir $(CONFIG)))
PORT ?= 9431
# The sample data gets small shards (configs/shards-sample.toml); real datasets the defaults.
SHARD_CONFIG := $(if $(filter $(SAMPLE),$(SRC)),--config configs/shards-sample.toml,)

.PHONY: help setup sample-data shards bench-shards bench-pipeline bench-model bench-service preview demo train-local test clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup: ## create .venv with the pinned dependencies (Pillow-SIMD from source); idempotent
	@bash scripts/setup.sh

sample-data: setup ## generate the embedded ImageNet-shaped sample dataset into data/sample
	$(PY) -m sampledata --out $(SAMPLE)

shards: setup ## shard ImageNet: make shards SRC=/path/to/imagenet OUT=data/shards [ARGS="--key value"]
	@if [ "$(SRC)" = "$(SAMPLE)" ]; then $(PY) -m sampledata --out $(SAMPLE); fi
	$(PY) -m shards --src $(SRC) --out $(OUT) $(SHARD_CONFIG) $(ARGS)

bench-shards: setup ## images/s of make shards (1 process, all cores) next to a bare decode+resize+encode loop
	$(PY) -m sampledata --out $(SAMPLE)
	$(PY) -m bench.bench_shards --src $(SAMPLE) --report bench/shards.json

bench-pipeline: setup ## DALI training pipeline vs the decode floor: make bench-pipeline SHARDS=... REPORT=...
	@if [ "$(SHARDS)" = "data/shards" ]; then $(MAKE) --no-print-directory shards; fi
	$(PY) -m bench.bench_pipeline --shards $(SHARDS) --report $(REPORT)

bench-model: setup ## forward+backward images/s of both model layouts (CPU, and GPU when present)
	$(PY) -m bench.bench_model --report bench/model.json

bench-service: setup ## service loop (metrics, logs, checkpoints) vs the bare train_step loop on the same batches
	@if [ "$(SHARDS)" = "data/shards" ] && [ ! -f data/shards/manifest.json ]; then $(MAKE) --no-print-directory shards; fi
	$(PY) -m bench.bench_service --report bench/service.json --shards $(SHARDS)

preview: shards ## a grid of augmented training images from the pipeline: data/preview.png
	$(PY) -m pipeline.preview --shards $(OUT) --out data/preview.png

demo: preview ## the main job on the sample data: shards -> pipeline -> the training service for 6 epochs
	$(PY) -m service --config configs/demo.toml --shards $(OUT) $(TRAIN_ARGS)

train-local: setup ## the service on this machine: make train-local [CONFIG=configs/demo.toml SHARDS=data/shards RUN=runs/<config> PORT=9431]
	@if [ "$(SHARDS)" = "data/shards" ] && [ ! -f data/shards/manifest.json ]; then $(MAKE) --no-print-directory shards; fi
	$(PY) -m service --config $(CONFIG) --shards $(SHARDS) --out $(RUN) --http.port $(PORT) $(TRAIN_ARGS)

test: setup ## run the test suite (CPU only)
	$(PY) -m pytest -q $(ARGS)

clean: ## remove generated data, runs and benchmark output (keeps .venv)
	rm -rf data runs bench/*.json bench/*.png
