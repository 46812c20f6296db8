# Two commands: `make serve` (serve the default bundle on this machine) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint system-deps

# The service alone: no torch.
$(VENV)/.serve-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# Everything: training (torch==2.13.0, the CPU wheel here), tests and linters.
$(VENV)/.all-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,dev]'
	touch $(VENV)/.serve-installed $@

serve: $(VENV)/.serve-installed
	$(VENV)/bin/isomax serve --host $(HOST) --port $(PORT)

system-deps:
	bash scripts/install_system_deps.sh

test: system-deps $(VENV)/.all-installed
	$(PY) -m pytest -q

lint: $(VENV)/.all-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
