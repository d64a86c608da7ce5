# The two commands of the README: `make run` (whole pipeline on the embedded default dataset,
# then the HTML report) and `make test`. Both create or reuse the local virtual environment .venv.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
# CPU machines take the CPU build of torch 2.13; GPU users set TORCH_SPEC to their own build.
TORCH_SPEC ?= torch==2.13.*
CORES ?= 2
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test test-slurm lint dry-run bench clean-results

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "spiscape needs Python >= 3.11; set PYTHON=/path/to/python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: $(BIN)/.installed
	$(BIN)/snakemake --profile profiles/default --cores $(CORES)
	$(BIN)/snakemake --profile profiles/default --report results/report.html
	@echo
	@echo "Done. Report: $(abspath results/report.html)"

# on every core (pytest-xdist): 4.5 min on 2 cores (README, Development), 8.5 min in one process
test: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not slurm" -n auto

# the tiny workflow through a real single-node SLURM (root: installs and starts it, .ci/slurm-up)
test-slurm: $(BIN)/.installed
	$(BIN)/python -m pytest -m slurm -v

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/snakemake --lint

dry-run: $(BIN)/.installed
	$(BIN)/snakemake --profile profiles/default -n

bench: $(BIN)/.installed
	$(BIN)/python bench/simulate.py

clean-results:
	rm -rf results .snakemake
