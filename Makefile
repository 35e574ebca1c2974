# The two commands of the README. Both create .venv themselves (pip, so the local torch copy is used).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-portable lint docs docs-build bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,docs,cluster]'
	touch $(STAMP)

# The main job: the quickstart sweep (search_spaces/quickstart.yaml) on the bundled digits, results in
# ./results (MLflow + Optuna SQLite stores, Parquet table); it ends with the summary and `bdlab ui`.
demo: $(STAMP)
	$(BIN)/bdlab sweep search_spaces/quickstart.yaml

test: $(STAMP) lint docs-build
	$(BIN)/python -m pytest -q tests

# The quality tests under PyTorch's portable CPU kernels: PyTorch picks its kernels by the processor's
# capability (default, avx2, avx512), and rounding differs between them, so this shows on one machine
# what another machine's kernels give. Every quality test passes under both (tests/quality.py).
test-portable: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -m quality tests

lint: $(STAMP)
	$(BIN)/ruff check platform trials tests benchmarks

# The documentation site (docs/, mkdocs.yml): served on http://127.0.0.1:8000; built strictly in `make test`,
# so a broken link, a page missing from the navigation or an unresolved API reference fails CI.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve -a 127.0.0.1:8000

docs-build: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

bench: $(STAMP)
	$(BIN)/python benchmarks/data_path.py

clean:
	rm -rf $(VENV) runs .pytest_cache .site
