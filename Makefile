# Two commands for a fresh clone:  `make demo` (set up, index the example photos, search)
# and `make test` (set up, lint, run the tests). Both create .venv on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so pip does not pick a multi-GB CUDA build where a CPU wheel is wanted; any
# torch >= 2.2 works (install your own first and set TORCH= to skip this step).
TORCH ?= torch==2.13.0
DEMO_INDEX ?= indexes/demo

.PHONY: setup demo test lint clean

$(BIN)/simsearch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install --quiet "$(TORCH)")
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/simsearch

# Uses SIMSEARCH_MODEL when set (a local model folder: the only way without hub access),
# else the default hub model.
demo: setup
	$(BIN)/simsearch index examples/photos --index $(DEMO_INDEX)
	$(BIN)/simsearch search examples/queries/cat-flipped-crop.jpg --index $(DEMO_INDEX) -k 3

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(DEMO_INDEX) .pytest_cache .ruff_cache
