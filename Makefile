# Two commands from a fresh clone:
#   make demo    plan and inject cbam_after_every_stage into a random-init timm resnet50, check identity
#   make test    the test suite (CPU, a few minutes on 2 cores); make test-slow: the slow ones;
#                make test-processes: the multi-process workflows (CI runs them too)
#   make lint    ruff check, ruff format --check and mypy (what CI runs before the tests)
#   make finetune-demo   the digits fine-tuning evidence (examples/digits_finetune.py; minutes on 2 cores)
#   make search-demo     attn-inject search on a digits transfer task (examples/search_demo.py; minutes)
# All create .venv on first use. `make zoo-test` runs the wider identity tests, `make zoo`
# the sweep of every timm and torchvision model (writes docs/zoo.md and docs/zoo.csv), `make zoo-kinds`
# every block kind on a sample (docs/zoo-kinds.md);
# `make bench` every benchmark, on an idle machine (writes docs/benchmarks.md; TIMM_TRAIN=path to
# timm's train.py, which timm's wheel does not hold, for the fine-tuning one).
# `make peer-timm` / `make peer-timm-more` / `make peer-torchvision VISION=path/to/vision`: the peers'
# own model tests on patched models against plain ones (docs/peers.md; an hour or more on 2 cores).

# The interpreter .venv is made from: the distribution's Python 3 where it has venv and is 3.10
# or newer (Debian and Ubuntu build it with profile-guided and link-time optimisation: the test
# suite runs in about four fifths of the time it takes on an unoptimised build, such as pyenv's
# default), else the first python3 on PATH. `make PYTHON=...` chooses another.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' \
	>/dev/null 2>&1 && echo /usr/bin/python3 || echo python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow test-processes lint zoo-test zoo zoo-kinds zoo-plan bench finetune-demo search-demo \
	peer-timm peer-timm-more peer-torchvision clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-cache-dir --upgrade pip
	$(BIN)/python -m pip install -q --no-cache-dir $(TORCH)
	$(BIN)/python -m pip install -q --no-cache-dir -e ".[test,dev,search]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/attn-inject demo

# Two test processes of one thread each: the fastest split of 2 cores (one process on two
# threads leaves a core idle through the many small steps; two on two threads each oversubscribe).
# Compiled modules and pytest's rewritten test modules are cached (PYTHONDONTWRITEBYTECODE
# cleared): the commands the tests start in processes of their own import the package compiled.
TEST_ENV := OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=
test: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -q -rs -n 2 --dist loadfile --no-loadscope-reorder

# The tests that run whole commands in processes of their own (search workers, torchrun, a
# pipe beside a terminal, a wheel built and installed, a signal sent to a running command,
# writers racing in two processes, a closed or full standard output): two minutes more, run by CI.
test-processes: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -q -rs -n 2 --dist loadfile --no-loadscope-reorder -m processes

# The tests marked slow (minutes each: torch.compile with inductor's C++ compiler).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

search-demo: $(STAMP)
	$(BIN)/python examples/search_demo.py --out build/search --docs docs

zoo-kinds: $(STAMP)
	$(BIN)/python examples/zoo_kinds.py --out docs

zoo-test: $(STAMP)
	$(BIN)/python -m pytest -q -m zoo

zoo: $(STAMP)
	$(BIN)/attn-inject zoo --identity-check --identity-every 5

zoo-plan: $(STAMP)
	$(BIN)/attn-inject zoo --out build/zoo

# timm's tests/test_models.py from its source distribution, torchvision's test/test_models.py from a
# pytorch/vision checkout at the installed version's tag (it publishes no source distribution);
# both run from build/peers/, outside the project, with peers/plugin.py patching what they build.
VISION ?=
peer-timm: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m peers.run timm

peer-timm-more: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m peers.run timm --more --jobs 3

peer-torchvision: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m peers.run torchvision $(if $(VISION),--source $(VISION))

finetune-demo: $(STAMP)
	$(BIN)/python examples/digits_finetune.py --out build/digits --docs docs

BENCH := build/bench
# timm's train.py, which the fine-tuning benchmark runs against: it is not in timm's wheel, so
# it is looked for before the first benchmark starts rather than twenty minutes in.
TIMM_TRAIN ?= build/timm-train/train.py
bench: $(STAMP)
	@test -f "$(TIMM_TRAIN)" || { echo "make bench: $(TIMM_TRAIN): no such file; put timm's train.py there or pass \
	TIMM_TRAIN=path/to/train.py (from a timm checkout or https://raw.githubusercontent.com/huggingface/\
	pytorch-image-models/v<version>/train.py)" >&2; exit 2; }
	$(BIN)/python benchmarks/bench_inject.py --out $(BENCH)/1-inject.md
	$(BIN)/python benchmarks/bench_models.py --out $(BENCH)/2-models.md
	$(BIN)/python benchmarks/bench_blocks.py --out $(BENCH)/3-blocks.md
	$(BIN)/python benchmarks/bench_blend.py --out $(BENCH)/4-blend.md
	$(BIN)/python benchmarks/bench_finetune.py --timm-train "$(TIMM_TRAIN)" --out $(BENCH)/5-finetune.md
	$(BIN)/python benchmarks/bench_build.py --out $(BENCH)/6-build.md
	$(BIN)/python benchmarks/collect.py $(BENCH)/1-inject.md $(BENCH)/2-models.md $(wildcard docs/gpu/*.md) \
		$(BENCH)/3-blocks.md $(BENCH)/4-blend.md $(BENCH)/5-finetune.md $(BENCH)/6-build.md --out docs/benchmarks.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
