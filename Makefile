# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch that lies on this project's machines; on a GPU box use e.g. `make demo TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,web
# extra flags for `rlhfkit demo` (CI runs the quick preset: DEMO_ARGS=--quick)
DEMO_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.rlhfkit-installed

.PHONY: demo test test-quick venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rlhfkit demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest

test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
