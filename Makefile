# Two commands: `make serve` (serve the default bundle on this machine) and `make test`.
# `make dev` installs the training and dev extras without testing (what `isomax train` needs);
# `make test-fast` skips slow and server-starting tests while developing; `make lint` is CI's first step.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve dev test test-fast lint system-deps

# The service alone: no torch.
$(VENV)/.serve-installed: pyproject.toml
	@echo "== installing the service into $(VENV) (fastapi, uvicorn, onnxruntime; no torch): about a minute, 250 MB"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# Everything: training (torch pinned to the CPU wheel by constraints-cpu.txt), batch scoring with
# its Ray engine, tests and linters.
$(VENV)/.all-installed: pyproject.toml constraints-cpu.txt
	@echo "== installing training + dev extras into $(VENV) (CPU torch, torchvision, onnx, scikit-learn, scikit-image, test tools): a few minutes, about 2.5 GB"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[train,dev,batch,ray]'
	touch $(VENV)/.serve-installed $@

serve: $(VENV)/.serve-installed
	@echo "== serving models/ on http://$(HOST):$(PORT)/ (Ctrl-C stops it). In a second terminal, try the"
	@echo "   images shipped in samples/: curl -s -H 'Content-Type: image/png' --data-binary @samples/fmnist-000-ankle-boot.png $(HOST):$(PORT)/classify"
	$(VENV)/bin/isomax serve --host $(HOST) --port $(PORT)

dev: $(VENV)/.all-installed

system-deps:
	bash scripts/install_system_deps.sh

# The full suite: what CI runs and what the README names.
test: system-deps $(VENV)/.all-installed
	@echo "== running the whole suite ($(PY) -m pytest -q): several minutes on 2 cores"
	$(PY) -m pytest -q

# While developing: everything but the slow tests and the ones that start real servers.
test-fast: $(VENV)/.all-installed
	$(PY) -m pytest -q -m 'not slow and not e2e and not ondemand'

lint: $(VENV)/.all-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
