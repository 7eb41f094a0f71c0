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
# make train (Docker) and make train-local share CONFIG and RUN with per-target defaults below.
GPUS ?= all
PORT ?= 9431
STACK = SHARDS="$(SHARDS)" RUN="$(RUN)" GPUS="$(GPUS)" NPROC="$(NPROC)" CONFIG="$(CONFIG)" bash scripts/stack.sh
# GRAFANA_PASSWORD as typed: make expands a '$' in a variable given on its command line, here and in
# what it exports to the recipe, so `make train GRAFANA_PASSWORD='pa$sw$(x)rd'` set Grafana's to
# "pawrd" without a word.
ifdef GRAFANA_PASSWORD
override export GRAFANA_PASSWORD := $(value GRAFANA_PASSWORD)
endif
# A Docker target that cannot run here (no docker, no engine, no NVIDIA runtime) stops with
# $(error): one line and a non-zero exit, without make's second "*** Error" line.  Expanded only
# when the recipe that uses it runs.
# GRAFANA_PASSWORD_SET: whether it is set, not the password itself (a command line shows in ps).
docker_check = $(eval _why := $(shell GPUS="$(GPUS)" BIND="$(BIND)" GRAFANA_PASSWORD_SET=$(if $(GRAFANA_PASSWORD),1) \
	SHARDS="$(SHARDS)" RUN="$(RUN)" CONFIG="$(CONFIG)" bash scripts/stack.sh check $(1)))$(if $(_why),$(error $(_why)))
# The sample data gets small shards (configs/shards-sample.toml); real datasets the defaults.
SHARD_CONFIG := $(if $(filter $(SAMPLE),$(SRC)),--config configs/shards-sample.toml,)

.PHONY: help setup sample-data shards bench-shards bench-pipeline bench-model bench-service bench-shard-check \
	gpu-check preview demo train-local predict test test-fast test-docker clean train stop logs shards-docker

# Each of these is optional and overrides the config file; the defaults differ by target.
train stop logs: CONFIG ?= configs/paper.toml
train stop logs: RUN ?= runs/alexnet
train stop logs: NPROC ?= auto
train-local: NPROC ?= 1
train-local: CONFIG ?= configs/demo.toml
train-local: RUN ?= runs/$(basename $(notdir $(CONFIG)))

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup: ## create .venv with the pinned dependencies (Pillow-SIMD from source); idempotent
	@bash scripts/setup.sh

sample-data: setup ## generate the embedded ImageNet-shaped sample dataset into data/sample
	$(PY) -m sampledata --out $(SAMPLE)

shards: setup ## shard ImageNet: make shards SRC=/path/to/imagenet OUT=data/shards [ARGS="--key value"]
	@if [ "$(SRC)" = "$(SAMPLE)" ]; then $(PY) -m sampledata --out $(SAMPLE); fi
	$(PY) -m shards --src $(SRC) --out $(OUT) $(SHARD_CONFIG) $(ARGS)

bench-shards: setup ## images/s of make shards at 1, 2 and all cores vs a bare decode+resize+encode loop, writer's share, ImageNet projection
	$(PY) -m sampledata --out $(SAMPLE)
	$(PY) -m bench.bench_shards --src $(SAMPLE) --report bench/shards.json

bench-pipeline: setup ## DALI training pipeline vs the decode floor: make bench-pipeline SHARDS=... REPORT=...
	@if [ "$(SHARDS)" = "data/shards" ]; then $(MAKE) --no-print-directory shards; fi
	$(PY) -m bench.bench_pipeline --shards $(SHARDS) --report $(REPORT)

bench-model: setup ## forward+backward images/s of both model layouts (CPU, and GPU when present)
	$(PY) -m bench.bench_model --report bench/model.json

bench-service: setup ## service loop (metrics, logs, checkpoints) vs the bare train_step loop; 1 vs 2 ranks at one global batch; the per-step agreement
	@if [ "$(SHARDS)" = "data/shards" ] && [ ! -f data/shards/manifest.json ]; then $(MAKE) --no-print-directory shards; fi
	$(PY) -m bench.bench_service --report bench/service.json --shards $(SHARDS)
	$(PY) -m bench.bench_scaling --report bench/scaling.json --shards $(SHARDS)
	$(PY) -m bench.bench_agree --report bench/agree.json

bench-shard-check: setup ## sha256 per core, the pre-training check on every core, training next to the background check
	$(PY) -m bench.bench_shard_check --report bench/shard_check.json

# gpu-check runs where `make setup` has not: PY=python3 WHEELS=dir use that interpreter and those wheels.
GPU_CHECK_OUT := $(if $(filter command line,$(origin OUT)),$(OUT),data/gpu-check)
SECONDS ?= 420
gpu-check: ## every GPU path measured in one go (dry mode without a GPU): [OUT=dir] [SECONDS=420] [PARTS=a,b] [PY=python3 WHEELS=dir]
	@if [ "$(PY)" = ".venv/bin/python" ]; then bash scripts/setup.sh; fi
	@PY="$(PY)" WHEELS="$(WHEELS)" bash scripts/gpu-check.sh --out "$(GPU_CHECK_OUT)" --seconds "$(SECONDS)" \
		$(if $(PARTS),--parts $(PARTS))

preview: shards ## a grid of augmented training images from the pipeline: data/preview.png
	$(PY) -m pipeline.preview --shards $(OUT) --out data/preview.png

demo: preview ## the main job on the sample data: shards -> pipeline -> the training service for 6 epochs -> predictions [PORT=9431 TRAIN_ARGS=...]
	$(PY) -m service --config configs/demo.toml --shards $(OUT) --http.port $(PORT) $(TRAIN_ARGS)
	@echo "What the trained model says about three validation images (make predict IMAGES=... for any others):"
	@$(PY) -m service.predict --run runs/demo --shards $(OUT) --top 3 $$(ls $(SAMPLE)/val/*/*.JPEG | awk 'NR % 27 == 1' | head -3)

# train-local's command, echoed on one line: the same line runs the service without make, with the
# service's own exit codes (make turns any failure into 2 and, when its process group gets SIGTERM
# or SIGINT, waits for the service's checkpoint and then dies of the signal itself: 143 or 130).
TRAIN_LOCAL = $(strip $(PY) -m $(if $(filter-out 1,$(NPROC)),service.launch --standalone --nproc-per-node \
	$(NPROC) -m )service --config $(CONFIG) --shards $(SHARDS) --out $(RUN) --http.port $(PORT) $(TRAIN_ARGS))

train-local: setup ## the service here, no Docker: make train-local [CONFIG=configs/demo.toml SHARDS=data/shards RUN=runs/<config> PORT=9431 NPROC=1]
	@if [ "$(SHARDS)" = "data/shards" ] && [ ! -f data/shards/manifest.json ]; then $(MAKE) --no-print-directory shards; fi
	@echo '$(subst ','\'',$(TRAIN_LOCAL))'
	@exec $(TRAIN_LOCAL)

predict: RUN ?= runs/demo
# Checked when make reads this file, so that a missing IMAGES is said before setup runs.
ifneq ($(filter predict,$(MAKECMDGOALS)),)
ifeq ($(strip $(IMAGES)),)
$(error make predict needs IMAGES, the image files to classify, e.g. IMAGES="data/sample/val/n90000001/*.JPEG")
endif
# RUN= (empty, a variable that was not set) made the first image the run directory.
ifneq ($(origin RUN),undefined)
ifeq ($(strip $(RUN)),)
$(error make predict: RUN is empty; give the run directory (RUN=runs/demo), or leave RUN out for runs/demo)
endif
endif
endif
# RUN quoted: a run directory's name may hold spaces (IMAGES is a list, globs allowed).
predict: setup ## what a trained run says images are (10 views, top 5): make predict IMAGES="a.jpg b.png" [RUN=runs/demo ARGS="--json"]
	$(strip $(PY) -m service.predict --run '$(subst ','\'',$(RUN))' $(ARGS) $(IMAGES))

train: ## Docker + GPUs: make train SHARDS=... RUN=... [GPUS=all|N|0,1|none] [NPROC=..] [CONFIG=..], GRAFANA_PASSWORD set
	$(call docker_check,train)
	@$(STACK) up

stop: ## stop the Docker stack (the trainer checkpoints first; make train resumes)
	$(call docker_check,stop)
	@$(STACK) stop

logs: ## follow the trainer's output in the Docker stack
	$(call docker_check,logs)
	@$(STACK) logs

shards-docker: ## make shards inside the image (no local environment): make shards-docker SRC=... OUT=... [ARGS=...]
	$(call docker_check,shards-docker)
	@SRC="$(SRC)" OUT="$(OUT)" ARGS="$(ARGS)" bash scripts/stack.sh shards

# Prometheus and promtool of the series docker/compose.yaml pins, for the tests that run them:
# Debian sid's (or testing's) packages, checked and unpacked into .cache/prometheus once (tests/prometheus_bin.py).
# Where they cannot be had, one line says so and those tests skip; .ci/run requires them.
PROMETHEUS_FOR_TESTS = $(PY) -m tests.prometheus_bin --optional >/dev/null

test: setup ## run the test suite (CPU only)
	@$(PROMETHEUS_FOR_TESTS)
	$(PY) -m pytest -q $(ARGS)

test-fast: setup ## the tests not marked slow (the edit-test loop; make test runs them all)
	@$(PROMETHEUS_FOR_TESTS)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-docker: setup ## build the image and run make train GPUS=none for real (as root, starts a Docker engine if none runs; 2-5 min, up to 12 when pip is slow)
	@bash scripts/test-docker.sh $(ARGS)

clean: ## remove what make demo, the tests and benchmarks wrote (keeps .venv, real shards in data/shards, runs other than runs/demo)
	@bash scripts/clean.sh
