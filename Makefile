# Plain entry points; the README names these targets. Each one does its own set-up.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0   # CPU build; GPU clusters: `make setup TORCH=` keeps their CUDA torch
NPROC   ?= 1               # the demo on 2 cores: one process runs 2.4x the steps/s of 2 ZeRO-3 ranks (docs/experiments.md)
RUN_DIR ?= runs/tiny
EVAL    ?= 1               # lmms-eval next to the stack (docs/evaluation.md, "lmms-eval"); EVAL=0 leaves it out
LMMS_EVAL := lmms-eval==0.7.3
comma   := ,

.PHONY: setup eval-setup constraints demo sweep-demo test gpu-smoke lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(if $(strip $(TORCH)),$(BIN)/pip install -q "$(strip $(TORCH))")
	$(BIN)/pip install -q -c constraints.txt -e ".[dev$(if $(filter 1,$(strip $(EVAL))),$(comma)eval)]"
	$(if $(filter 1,$(strip $(EVAL))),$(BIN)/pip install -q -c constraints.txt --no-deps "$(LMMS_EVAL)")
	touch $@

setup: $(VENV)/.installed ## create .venv and install the package (CPU torch pinned)

# lmms-eval's own requirements pull a CUDA torchvision that breaks a CPU torch: its runtime comes from the
# eval extra and lmms-eval itself goes in without them (docs/evaluation.md, section "lmms-eval").
eval-setup: setup ## add lmms-eval to a .venv made with EVAL=0 (or before it was in `make setup`)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,eval]"
	$(BIN)/pip install -q -c constraints.txt --no-deps "$(LMMS_EVAL)"

constraints: setup ## pin what is installed now as the tested versions (after a deliberate upgrade)
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -viE '^(torch|maven[-_]dist)=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

demo: setup ## the main job: four tiny stages on CPU, synthetic data, SQLite MLflow store
	DS_ACCELERATOR=cpu $(BIN)/maven pipeline recipes/tiny --nproc $(NPROC) --set run_dir=$(RUN_DIR)

sweep-demo: setup ## the keep-ratio ablation at toy size: 3 arms, one MLflow store, an HTML report
	DS_ACCELERATOR=cpu $(BIN)/maven sweep recipes/ablations/tiny-keep-ratio.yaml --nproc $(NPROC)

test: setup ## the whole test suite (unit, distributed, integration)
	bash tests/run_all.sh

# Not part of `test`, and no `setup` prerequisite: on a GPU machine the venv holds its CUDA torch (`make setup TORCH=`).
gpu-smoke: ## one GPU, < 8 min: every first-day command at 7B layer shapes (bench/gpu_smoke.py); "skipped: no GPU" without one
	bash bench/gpu_smoke.sh

lint: setup
	$(BIN)/ruff check maven_dist tools tests bench
	$(BIN)/ruff format --check maven_dist tools tests bench
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff format maven_dist tools tests bench
	$(BIN)/ruff check --fix maven_dist tools tests bench

clean:
	rm -rf runs .pytest_cache
