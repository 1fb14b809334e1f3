# Two commands: `make demo` and `make test`. Both create .venv through `make install` when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

# torch is pinned here (a CPU wheel on this machine) before anything can pull a CUDA build.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) examples/quick_demo.py

bench: install
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) build *.egg-info
