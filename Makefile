# The two commands are `make demo` (the benchmark) and `make test` (ruff + the suite); the other targets are the
# experiments and benchmarks behind docs/. Every target creates .venv through `make install` when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
# the memorization benchmark (benchmarks/memorization/, outside the package), run from the repository root
BENCH := $(PY) -m benchmarks.memorization

.PHONY: install test test-compat coverage demo demo-full demo-wide quick-demo manpages docstrings realtext repetition epochs finetune scale noisy-ids noisy-ids-privacy attribution bench bench-gpu bench-compile clean

# The supported range (README, "Supported versions"): the oldest and the newest release of each dependency
# tested together. `make install` puts the newest Transformers in .venv; `make test-compat` runs the core of
# the suite on both ends, each in its own venv (.venv-compat-oldest, .venv-compat-newest).
COMPAT_oldest := transformers==5.20.0 huggingface_hub==2.0.0 accelerate==1.10.1 datasets==5.1.0 peft==0.18.0 \
	trl==1.16.0
COMPAT_newest := transformers==5.25.0 huggingface_hub==2.4.0 accelerate==1.16.0 datasets==5.2.0 peft==0.21.2 \
	trl==1.16.0 kernels==0.19.1
COMPAT_TESTS := tests/model/test_removal.py tests/model/test_architectures.py tests/model/test_modes.py \
	tests/integrations/test_trainer.py tests/integrations/test_sft.py tests/integrations/test_peft.py \
	tests/checkpoints/test_checkpoints.py tests/sightings/test_general_sightings.py tests/publishing \
	tests/test_hub_kernels.py tests/test_layout.py tests/layers/test_active_sinks_lora.py

install: $(STAMP)

# torch is pinned here (a CPU wheel on this machine) before anything can pull a CUDA build.
$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev]" $(filter transformers==%,$(COMPAT_newest))
	touch $(STAMP)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

# Same order as .venv: torch first, then the package (its trl and peft extras) with the pins of that end.
.venv-compat-%/.installed: setup.cfg pyproject.toml Makefile
	test -x .venv-compat-$*/bin/python || $(PYTHON) -m venv .venv-compat-$*
	.venv-compat-$*/bin/python -m pip install -q --upgrade pip
	.venv-compat-$*/bin/python -m pip install -q $(TORCH_PIN)
	.venv-compat-$*/bin/python -m pip install -q -e ".[trl,peft]" pytest $(COMPAT_$*)
	touch $@

test-compat: .venv-compat-oldest/.installed .venv-compat-newest/.installed
	.venv-compat-oldest/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)
	.venv-compat-newest/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)

# Every causal-LM type of the installed Transformers, tiny and random (83 s measured on 2 CPU cores):
# docs/coverage.json and docs/supported_models.md. `make test` runs a subset.
coverage: install
	$(PY) tests/coverage_models.py

# The memorization benchmark's headline on the embedded corpus, usual 4x MLP, two processes (7:22 on an idle
# 2-core machine): standard, memsinks (sinks removed) and Goldfish; the table at the end, runs/demo/report.md + plots.
demo: install
	$(BENCH) run configs/demo.yaml --out runs/demo

# The whole benchmark on the same setting (44:56 in one process; two now): also dedup, post-hoc, memsinks+goldfish,
# exposure of the secret canaries, and the forgetting experiment with the unlearning baselines: runs/demo-full.
demo-full: install
	$(BENCH) run configs/demo_full.yaml --out runs/demo-full

# The same on a 16x-wide MLP (2 layers x 64, MLP 1024).
demo-wide: install
	$(BENCH) run configs/demo_wide.yaml --out runs/demo_wide

# Real text: paragraphs of the installed manual pages (data/manpages.jsonl), then the benchmark on them.
data/manpages.jsonl:
	$(MAKE) install
	$(PY) -m benchmarks.memorization.manpages --out $@

manpages: data/manpages.jsonl

# A second real-text corpus: the paragraphs of the Python standard library's docstrings (data/docstrings.jsonl).
data/docstrings.jsonl:
	$(MAKE) install
	$(PY) -m benchmarks.memorization.docstrings --out $@

docstrings: data/docstrings.jsonl

# Where repetition is worth something (docs/repetition.md), seeds 0 and 1 in two processes. `repetition`: from
# scratch, a background seen once beside a domain's documents repeated 8 times, two (background, domain) pairs
# (stories + manual pages, manual pages + docstrings). `epochs`: a pretrained base fine-tuned for 3 and 8 epochs.
# Tables: runs/repetition/*.md, runs/epochs/report.md (9:24 and 13:23 wall clock on the idle 2-core machine).
REP := $(BENCH) repetition
repetition: install data/manpages.jsonl data/docstrings.jsonl
	$(REP) configs/repetition_domain.yaml --out runs/repetition/manpages/seed0 & first=$$!; \
	$(REP) configs/repetition_domain.yaml seed=1 --out runs/repetition/manpages/seed1 & second=$$!; \
	wait $$first && wait $$second
	$(REP) configs/repetition_domain_docstrings.yaml --out runs/repetition/docstrings/seed0 & first=$$!; \
	$(REP) configs/repetition_domain_docstrings.yaml seed=1 --out runs/repetition/docstrings/seed1 & second=$$!; \
	wait $$first && wait $$second
	$(BENCH) repetition-table runs/repetition/manpages/seed0 runs/repetition/manpages/seed1 --out runs/repetition/manpages.md
	$(BENCH) repetition-table runs/repetition/docstrings/seed0 runs/repetition/docstrings/seed1 \
		--out runs/repetition/docstrings.md

epochs: install data/manpages.jsonl
	$(REP) configs/repetition_epochs.yaml --out runs/epochs/seed0 & first=$$!; \
	$(REP) configs/repetition_epochs.yaml seed=1 --out runs/epochs/seed1 & second=$$!; \
	wait $$first && wait $$second
	$(BENCH) repetition-table runs/epochs/seed0 runs/epochs/seed1 --out runs/epochs/report.md

realtext: install data/manpages.jsonl
	$(BENCH) run configs/manpages.yaml --out runs/manpages

# The user's path: pretrain on the stories, fine-tune on manual pages with repeated private documents, full
# fine-tune / LoRA / Goldfish / dedup / MemSinkConfig.for_finetuning(), two seeds: runs/finetune (docs/finetune.md).
finetune: install data/manpages.jsonl
	$(BENCH) finetune configs/finetune.yaml --out runs/finetune

# Gap closure and val-loss cost against model size, 4x and 16x MLPs (standard + memsinks per point), at the
# sink_lr_scale 1, as docs/scale.md was measured (the default is 4 since).
scale: install
	$(BENCH) scale configs/demo_full.yaml memsinks.sink_lr_scale=1 --models 2x64,4x128,4x192 --mlp-ratios 4,16 --out runs/demo-scale

# Where the memorization left after sink removal lives: components swapped with a twin trained without
# the canaries (docs/isolation.md); about 10 minutes.
attribution: install
	$(BENCH) attribute configs/demo_full.yaml --out runs/attribution

# Sequence IDs as users have them (noisy, missing, coarse, near-duplicate repeats) at the library defaults and
# the demo's full length, seeds 0 and 1 in two processes (14 trainings each, about 5 min a training on one idle
# core: over an hour): runs/noisy_ids/seed*/. noisy-ids-privacy: the privacy setting on the noise conditions.
NOISY_CONDITIONS := --noise 0.02,0.05,0.1,0.3,0.5 --missing 0.3 --coarse 4,16 --edits 3
noisy-ids: install
	$(BENCH) noisy-ids configs/noisy_ids.yaml $(NOISY_CONDITIONS) --out runs/noisy_ids/seed0 & first=$$!; \
	$(BENCH) noisy-ids configs/noisy_ids.yaml seed=1 $(NOISY_CONDITIONS) --out runs/noisy_ids/seed1 & second=$$!; \
	wait $$first && wait $$second

noisy-ids-privacy: install
	$(BENCH) noisy-ids configs/noisy_ids.yaml memsinks.general_sightings=1 --noise 0.1,0.3 --missing "" --coarse "" \
		--edits 0 --out runs/noisy_ids_privacy/seed0 & first=$$!; \
	$(BENCH) noisy-ids configs/noisy_ids.yaml seed=1 memsinks.general_sightings=1 --noise 0.1,0.3 --missing "" \
		--coarse "" --edits 0 --out runs/noisy_ids_privacy/seed1 & second=$$!; \
	wait $$first && wait $$second

# The 45-second toy version (random canaries in a bigram language).
quick-demo: install
	$(PY) examples/quick_demo.py

# Side-by-side cost of sinks: the MLP's own cost (bench.py, benchmarks/bench.json), then what the fine-tuning
# recipes cost on GPT-2 small and a 160M Llama against the full fine-tune and LoRA r16, with 1B and 7B computed
# (finetune_cost.py, benchmarks/finetune_cost.json). docs/performance.md has both tables and their times.
bench: install
	$(PY) benchmarks/bench.py --out benchmarks/bench.json
	$(PY) benchmarks/finetune_cost.py --out benchmarks/finetune_cost.json

# The same tables on a GPU in bf16, shapes up to a 1B-parameter Llama (needs a CUDA build of torch).
bench-gpu: install
	$(PY) benchmarks/bench.py --device cuda --dtype bf16 --out benchmarks/bench_gpu.json
	$(PY) benchmarks/finetune_cost.py --device cuda --dtype bf16 --shapes gpt2-124m,llama-1b --steps 5 \
		--out benchmarks/finetune_cost_gpu.json

# torch.compile of the patched model against eager and against the compiled plain model.
bench-compile: install
	$(PY) benchmarks/bench.py --compile --reps 12 --out benchmarks/compile.json

clean:
	rm -rf $(VENV) .venv-compat-oldest .venv-compat-newest build *.egg-info
