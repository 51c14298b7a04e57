# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-loaded lint docs bench lab clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hangkit demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The documentation, with warnings as errors; the CLI reference is generated from the parser.
docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs build/docs

test: $(STAMP) lint docs
	$(VENV)/bin/pytest
	HANGKIT_NONINTERACTIVE= $(VENV)/bin/pytest --nbval-lax --nbval-cell-timeout=300 notebooks -p no:cacheprovider

# The hang, watch, demo and cluster tests while two busy processes take both cores: verdicts
# must not depend on ranks starting quickly. (`python tests/under_load.py 2 -- make test` for all.)
test-loaded: $(STAMP)
	$(PY) tests/under_load.py 2 -- $(VENV)/bin/pytest tests/test_watch_hangs.py \
		tests/test_watch_confirm.py tests/test_watch_basics.py tests/test_progress.py \
		tests/test_demo.py tests/test_jupyter_cluster.py tests/test_flight_recorder.py \
		tests/test_jupyter_magic.py tests/test_shim.py tests/test_multinode.py \
		tests/test_inject.py tests/test_frameworks.py tests/test_attach.py tests/test_watch_death.py

# JupyterLab on the notebooks, on this machine (ssh -L 8888:localhost:8888 to reach it).
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --no-browser --ip 127.0.0.1 --port 8888 notebooks

bench: $(STAMP)
	$(PY) benchmarks/bench_watch.py
	$(PY) benchmarks/bench_agent.py
	$(PY) benchmarks/bench_doctor.py
	$(PY) benchmarks/bench_trust.py
	$(PY) benchmarks/bench_hostile_monitor.py
	$(PY) benchmarks/bench_flight_recorder.py
	$(PY) benchmarks/bench_notebook_cells.py
	$(PY) benchmarks/bench_multinode.py
	$(PY) benchmarks/bench_inject.py
	$(PY) benchmarks/bench_frameworks.py
	$(PY) benchmarks/bench_attach.py
	$(PY) benchmarks/bench_hostile_dump.py

clean:
	rm -rf $(VENV) build *.egg-info
