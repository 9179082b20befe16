# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench bench-quick system-deps clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[driver,test]'
	touch $(STAMP)

system-deps:
	@bash scripts/ensure-system-deps.sh

demo: $(STAMP) system-deps
	$(BIN)/fruitpipe demo-data data/demo --classes 20 --per-class 30 --seed 0
	$(BIN)/fruitpipe run data/demo output/demo --mode full --overwrite

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -m slow

bench-quick: $(STAMP) system-deps
	$(BIN)/python bench/run_bench.py --quick

bench: $(STAMP) system-deps
	$(BIN)/python bench/run_bench.py

clean:
	rm -rf $(VENV) output data/demo
