# Two entry points on a fresh machine: `make run` (dashboard on the bundled demo) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8501

.PHONY: run test setup bench

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m streamlit run app.py --server.port $(PORT) --server.headless true

test: setup
	$(PY) -m pytest -q

# Long benchmarks are not tests: PatchCore on the shared real categories.
bench: setup
	$(PY) -m core bench --data ../shared/datasets/bottle ../shared/datasets/magnetic_tile --json bench_results/patchcore.json
