# Two commands: `make lab` and `make test` (both set up .venv on first use).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PRESET ?= ci
STAMP := $(VENV)/.installed
# pip extras; CI adds ray (`make test EXTRAS=test,peer,graphs,serve,ray`) to run the Ray Serve test
EXTRAS ?= test,peer,graphs,serve

.PHONY: lab test setup jupyter workshop clean

setup: $(STAMP)

# torch first, pinned: it resolves to the local CPU wheel; any other spec pulls CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (labkit)" > /dev/null
	touch $(STAMP)

lab: setup
	$(BIN)/labkit run --preset $(PRESET)
	@echo "executed notebooks: artifacts/$(PRESET)/notebooks/   ledger: artifacts/$(PRESET)/ledger.jsonl"
	@echo "report: artifacts/$(PRESET)/report.html and report.csv (the executed 09_report.ipynb has the plots)"

test: setup
	$(BIN)/python -m pytest -q

# participant notebooks (solutions replaced by stubs) from notebooks/ into workshop/, then the drift/leak check
workshop: setup
	$(BIN)/labkit workshop build > /dev/null
	$(BIN)/labkit workshop check

jupyter: setup
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf artifacts
