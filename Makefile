# Two commands for a fresh machine: `make demo` (whole workflow on generated demo data)
# and `make test` (test suite). Both create .venv through `make setup` when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build here; on a GPU cluster use e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index.
TORCH_SPEC ?= torch==2.13.0
CORES ?= 2
CONFIG ?= config/demo.yaml
# Rules call the `scgpt-vcc` command installed in the environment.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable ".[workflow,test]"
	# Upstream scGPT is the test oracle for our model; its own dependencies (torchtext)
	# no longer load with current torch, so it is installed without them.
	$(BIN)/python -m pip install --quiet --no-deps "scgpt==0.2.4"
	touch $@

demo: setup
	$(BIN)/snakemake --configfile $(CONFIG) --cores $(CORES)

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/snakefmt --check workflow
	$(BIN)/snakemake --lint --configfile $(CONFIG)

clean:
	rm -rf results logs benchmarks resources/demo .snakemake
