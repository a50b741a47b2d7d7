# featcache: `make heads` runs the main job (extract, then heads), `make test` the tests.
# Both install what they need into .venv first.

PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
SHARED   := ../shared
# Local copies in ../shared are used when present; otherwise Keras downloads CIFAR-10 and the weights.
DATA     ?= $(if $(wildcard $(SHARED)/datasets/cifar10-jpeg),$(SHARED)/datasets/cifar10-jpeg,cifar10)
WEIGHTS  ?= $(if $(wildcard $(SHARED)/weights/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5),$(SHARED)/weights/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5,imagenet)
LAYER    ?= block3_pool
# Compute precision of the backbone: float32 (default), bfloat16, float16, or auto (what this machine runs fastest)
PRECISION ?= float32
CACHE_DIR ?= cache
EXTRACT_ARGS ?=
RUNS_DIR ?= runs
BASELINE_EPOCHS ?= 10
# `make search`: the space and budget of the documented head search
SEARCH_ARGS ?= --param 'head=dense|conv' --param 'pooling=gap|flatten' --param 'dropout=0.1:0.6' \
	--param 'lr=1e-4:3e-3:log' --trials 60 --timeout 1800
# `make finetune`: VGG16 cached at block2_pool with one augmented view (flip, crop), block3 fine-tuned with a flatten
# head, the cached maps shifted by up to a cell (4 px) in training, the fine-tuning rate cosine-decayed over 7 epochs
FINETUNE_ARGS ?= --pooling flatten --epochs 9 --map-shift 1 --lr-schedule cosine
FT_SELECT = --data "$(DATA)" --weights "$(WEIGHTS)" --layer block2_pool --views 2 --precision $(PRECISION)
SELECT   = --data "$(DATA)" --weights "$(WEIGHTS)" --layer $(LAYER) --precision $(PRECISION)
export FEATCACHE_CACHE_DIR := $(CACHE_DIR)

.DEFAULT_GOAL := help
.PHONY: help install extract heads curve search finetune bench bench-gpu study docs lint test test-slow clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: DATA=$(DATA) WEIGHTS=$(WEIGHTS) LAYER=$(LAYER) PRECISION=$(PRECISION) CACHE_DIR=$(CACHE_DIR)"

install: $(VENV)/.installed ## create .venv and install featcache with its dev tools

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

extract: install ## cache VGG16 features of DATA at LAYER (a second run is an instant cache hit)
	$(BIN)/featcache extract $(SELECT) $(EXTRACT_ARGS)

heads: extract ## train the default head, the reference head (gap, flatten), a linear probe, the ANN and CNN baselines; print the table
	$(BIN)/featcache train-head $(SELECT) --runs-dir $(RUNS_DIR) --name default
	$(BIN)/featcache train-head $(SELECT) --runs-dir $(RUNS_DIR) --name dense-gap --head dense
	$(BIN)/featcache train-head $(SELECT) --runs-dir $(RUNS_DIR) --name dense-flatten --head dense --pooling flatten
	$(BIN)/featcache train-head $(SELECT) --runs-dir $(RUNS_DIR) --name linear --head linear
	@echo "the heads so far (the baselines follow: the CNN takes about 24 minutes on 2 cores):" >&2
	$(BIN)/featcache runs --runs-dir $(RUNS_DIR) --markdown
	$(BIN)/featcache train-baseline ann --data "$(DATA)" --runs-dir $(RUNS_DIR) --epochs $(BASELINE_EPOCHS) --name ann
	$(BIN)/featcache train-baseline cnn --data "$(DATA)" --runs-dir $(RUNS_DIR) --epochs $(BASELINE_EPOCHS) --name cnn
	$(BIN)/featcache runs --runs-dir $(RUNS_DIR) --markdown | tee $(RUNS_DIR)/summary.md

curve: extract ## data-efficiency curve (default head, linear probe, kNN; 5..1000 per class and all) and the long-tail table (~15 min); docs/results/curve.*, docs/results/longtail.*
	d=$$($(BIN)/featcache -q curve $(SELECT) --runs-dir $(RUNS_DIR)) && cp "$$d"/curve.json "$$d"/curve.md "$$d"/curve.png docs/results/
	d=$$($(BIN)/featcache -q curve $(SELECT) --long-tail 10,50 --tail-max 500 --runs-dir $(RUNS_DIR)) && \
		cp "$$d"/longtail.json "$$d"/longtail.md docs/results/

search: extract ## a head search on the cache (Optuna TPE, median pruning, 30 min of trials on 2 cores, then its winner tested); docs/results/search*
	d=$$($(BIN)/featcache -q search $(SELECT) --runs-dir $(RUNS_DIR) --name make $(SEARCH_ARGS)) && \
		cp "$$d"/search.md docs/results/search.md && cp "$$d"/search.json docs/results/search.json && \
		for f in history slice importances; do cp "$$d"/$$f.png docs/results/search-$$f.png; done

finetune: install ## fine-tune VGG16's block3 from a cached block2_pool (2 views) with the dense head; prints the run (~35 min on 2 cores)
	$(BIN)/featcache extract $(FT_SELECT)
	$(BIN)/featcache train-head $(FT_SELECT) --head finetune --runs-dir $(RUNS_DIR) --name finetune $(FINETUNE_ARGS)
	$(BIN)/featcache runs --runs-dir $(RUNS_DIR) --markdown

bench: extract ## measure speed, size, memory, precision, decoding, streaming and the Ray engine side by side; writes docs/results/benchmarks*.md, .json (~30 min, 12 GB of disk)
	$(BIN)/python bench/run.py --data "$(DATA)" --weights "$(WEIGHTS)" \
		--cache "$$($(BIN)/featcache -q extract $(SELECT) --no-progress)"
	$(BIN)/python bench/precision.py --data "$(DATA)" --weights "$(WEIGHTS)"
	$(BIN)/python bench/stream.py --cache "$$($(BIN)/featcache -q extract $(SELECT) --no-progress)"
	$(BIN)/python bench/scaling.py --data "$(DATA)" --weights "$(WEIGHTS)"
	$(BIN)/python bench/predict.py --data "$(DATA)" --weights "$(WEIGHTS)" \
		--run "$$($(BIN)/featcache -q train-head $(SELECT) --runs-dir $(RUNS_DIR)/bench --name default --no-progress)"
	$(BIN)/python bench/default_head.py --cache "$$($(BIN)/featcache -q extract $(SELECT) --no-progress)"
	$(BIN)/python bench/probe.py --cache "$$($(BIN)/featcache -q extract $(SELECT) --no-progress)"
	$(BIN)/python bench/search.py --cache "$$($(BIN)/featcache -q extract $(SELECT) --no-progress)"
	$(BIN)/python bench/epoch_start.py --cache "$$($(BIN)/featcache -q extract $(SELECT) --no-progress)"
	$(BIN)/python bench/restarts.py --cache "$$($(BIN)/featcache -q extract $(SELECT) --no-progress)"
	KERAS_BACKEND=jax $(BIN)/python bench/restarts.py --cache "$$($(BIN)/featcache -q extract $(SELECT) --no-progress)"
	$(BIN)/python bench/finetune.py --data "$(DATA)" --weights "$(WEIGHTS)" \
		--cache "$$($(BIN)/featcache -q extract $(FT_SELECT) --no-progress)"
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/head_epoch.py
	KERAS_BACKEND=jax $(BIN)/python bench/head_epoch.py
	$(BIN)/python bench/stacked_heads.py
	KERAS_BACKEND=jax $(BIN)/python bench/stacked_heads.py

bench-gpu: install ## extraction img/s on the accelerator: 32/224 px, float32 and auto precision (< 5 min); docs/results/benchmarks-gpu.*
	$(BIN)/python bench/gpu.py

study: install ## the accuracy study: input size x layer x views x head, chosen on validation (42 min with caches, 3.5 h without)
	$(BIN)/python bench/study.py --data "$(DATA)" --weights "$(WEIGHTS)" --cache-dir $(CACHE_DIR) \
		--runs-dir $(RUNS_DIR)/study

docs: install ## regenerate the reference pages (docs/reference/cli.md, api.md) from the code; tests check they are current
	$(BIN)/python -m featcache.cli.reference docs/reference

lint: install ## the import contracts (layers, function-local imports counted) and ruff
	$(BIN)/lint-imports
	$(BIN)/ruff check .

test: lint ## the import contracts, ruff, then the test suite in two processes, less the slow tests (about 2 minutes on 2 cores)
	$(BIN)/pytest -q -n 2 --dist loadgroup -m "not slow"

test-slow: install ## the slow tests alone: whole commands on real models, Ray clusters, JAX processes (CI runs them after make test)
	$(BIN)/pytest -q -n 2 --dist loadgroup -m slow

clean: ## remove caches, runs and build leftovers (keeps .venv)
	if [ -d "$(CACHE_DIR)" ]; then find "$(CACHE_DIR)" -mindepth 1 ! -name .gitignore -delete; fi
	rm -rf "$(RUNS_DIR)" .pytest_cache *.egg-info
