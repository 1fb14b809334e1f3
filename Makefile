# Two commands: `make demo` and `make test` (plus `make coverage`, `make bench`). Both create .venv through `make install` when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test coverage demo quick-demo bench bench-compile clean

install: $(STAMP)

# torch is pinned here (a CPU wheel on this machine) before anything can pull a CUDA build.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

# Every causal-LM type of the installed Transformers, tiny and random (~5 min on 2 CPU cores):
# docs/coverage.json and README's "Supported model types" section. `make test` runs a subset.
coverage: install
	$(PY) tests/coverage_models.py

# The memorization benchmark on the embedded corpus: standard, memsinks, dedup, post-hoc, goldfish,
# memsinks+goldfish and the forgetting experiment (~14 min on 2 CPU cores, estimated): runs/demo/report.md + plots.
demo: install
	$(VENV)/bin/hf-memsinks run configs/demo.yaml --out runs/demo

# The 45-second toy version (random canaries in a bigram language).
quick-demo: install
	$(PY) examples/quick_demo.py

# Side-by-side cost of sinks (under 10 min here): a table and benchmarks/bench.json.
bench: install
	$(PY) benchmarks/bench.py --out benchmarks/bench.json

# torch.compile of the patched model against eager and against the compiled plain model.
bench-compile: install
	$(PY) benchmarks/bench.py --compile --reps 12 --out benchmarks/compile.json

clean:
	rm -rf $(VENV) build *.egg-info
