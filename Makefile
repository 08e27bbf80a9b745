# Two entry points (README): `make run` and `make test`. Both create .venv,
# install the CPU build of torch (torch==2.13.0) and weightpca into it, then run.
# GPU users: make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu126

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
CORES ?= 8
BIN := $(VENV)/bin

.PHONY: install run test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

run: install
	. $(BIN)/activate && snakemake --cores $(CORES) all

test: install
	. $(BIN)/activate && python -m pytest -q

lint: install
	. $(BIN)/activate && ruff check . && ruff format --check . && snakemake --lint && snakefmt --check Snakefile workflow/rules

clean:
	rm -rf results .snakemake
