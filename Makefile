# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The Spark 3.5 line (EMR 7.11-7.13 ship 3.5.6; Dataproc 2.2 and Databricks LTS are 3.5 too): a second environment,
# the same lock but this pyspark and its py4j, where `make test` runs the Spark tests again.
SPARK35_VENV := .venv-spark35
SPARK35_PINS := pyspark==3.5.6 py4j==0.10.9.7
SPARK35_STAMP := $(SPARK35_VENV)/.installed
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: demo test test-suite test-spark35 test-slow bench bench-quick system-deps clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -c requirements.lock -e '.[driver,test]'
	touch $(STAMP)

$(SPARK35_STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(SPARK35_VENV)
	grep -v -E '^(pyspark|py4j)==' requirements.lock > $(SPARK35_VENV)/constraints.txt
	$(SPARK35_VENV)/bin/pip install $(PIP_FLAGS) -c $(SPARK35_VENV)/constraints.txt $(SPARK35_PINS) -e '.[driver,test]'
	touch $(SPARK35_STAMP)

system-deps:
	@bash scripts/ensure-system-deps.sh

demo: $(STAMP) system-deps
	$(BIN)/fruitpipe demo-data data/demo --classes 20 --per-class 30 --seed 0
	$(BIN)/fruitpipe run data/demo output/demo --mode full --overwrite

# The whole suite on the locked Spark 4.0, then the Spark-touching tests on Spark 3.5.
test: test-suite test-spark35

# Tests that run the deployed command under Spark 3.5's own spark-submit (tests/test_emr_node.py) find it here.
export FRUITPIPE_SPARK35_VENV := $(abspath $(SPARK35_VENV))

test-suite: $(STAMP) $(SPARK35_STAMP) system-deps
	$(BIN)/python -m pytest -q

# The Spark-touching tests of every kind (pipeline, resume, faults, the loopback cluster, S3, spark-submit); the
# rest of the suite runs Spark the same way and stays on 4.0 to keep `make test` within half an hour.
SPARK35_TESTS := tests/test_pipeline.py tests/test_resume.py tests/test_faults.py tests/test_cluster.py \
	tests/test_s3.py tests/test_spark_submit.py

test-spark35: $(SPARK35_STAMP) system-deps
	$(SPARK35_VENV)/bin/python -m pytest -q $(SPARK35_TESTS)

test-slow: $(STAMP) $(SPARK35_STAMP) system-deps
	$(BIN)/python -m pytest -q -m slow

bench-quick: $(STAMP) system-deps
	$(BIN)/python bench/run_bench.py --quick

bench: $(STAMP) system-deps
	$(BIN)/python bench/run_bench.py

clean:
	rm -rf $(VENV) $(SPARK35_VENV) output data/demo
