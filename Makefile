# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick bench-smoke clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/infscale demo --out demo-output

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check infscale tests benchmarks

# Full suite, about 40 min on an idle 2-core machine (a fixed budget per section, see
# benchmarks/run_all.py); extra options through BENCH_ARGS, e.g. BENCH_ARGS="--only wide,calculators".
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) benchmarks/run_all.py --quick $(BENCH_ARGS)

# Tiny sizes, only checks that every code path runs; writes to /tmp, never to docs/.
bench-smoke: $(STAMP)
	$(PY) benchmarks/run_all.py --smoke --out /tmp/infscale-bench-smoke/benchmarks.md $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache
