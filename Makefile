# The two commands of the README. Both create .venv themselves (pip, so the local torch copy is used).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The main job: for now, a BadNets attack on the bundled digits, then BCU and CLP on it with their CPU
# presets (the sweep work turns this into the quickstart sweep).
demo: $(STAMP)
	run=runs/demo-$$(date +%Y%m%d-%H%M%S) && \
	$(BIN)/bdlab attack --dataset digits --model mini_resnet --attack badnets --clean-reference --out $$run/attack && \
	$(BIN)/bdlab defend --attacked $$run/attack --defense bcu --preset cpu --out $$run/bcu && \
	$(BIN)/bdlab defend --attacked $$run/attack --defense clp --preset cpu --out $$run/clp

test: $(STAMP) lint
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check platform trials tests benchmarks

bench: $(STAMP)
	$(BIN)/bdlab bench

clean:
	rm -rf $(VENV) runs .pytest_cache
