# Two commands: `make serve` (serve the default bundle on this machine) and `make test`.
# `make test-fast` skips slow and server-starting tests while developing; `make lint` is CI's first step.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test test-fast lint system-deps

# The service alone: no torch.
$(VENV)/.serve-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# Everything: training (torch pinned to the CPU wheel by constraints-cpu.txt), batch scoring with
# its Ray engine, tests and linters.
$(VENV)/.all-installed: pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[train,dev,batch,ray]'
	touch $(VENV)/.serve-installed $@

serve: $(VENV)/.serve-installed
	$(VENV)/bin/isomax serve --host $(HOST) --port $(PORT)

system-deps:
	bash scripts/install_system_deps.sh

# The full suite: what CI runs and what the README names.
test: system-deps $(VENV)/.all-installed
	$(PY) -m pytest -q

# While developing: everything but the slow tests and the ones that start real servers.
test-fast: $(VENV)/.all-installed
	$(PY) -m pytest -q -m 'not slow and not e2e and not ondemand'

lint: $(VENV)/.all-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
