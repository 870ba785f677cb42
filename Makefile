# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick bench-smoke bench-render clean

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
# benchmarks/config.py); extra options through BENCH_ARGS, e.g. BENCH_ARGS="--only wide,calculators".
# Saves each section's results in docs/benchmarks-data/<section>.json, then renders docs/benchmarks.md.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) benchmarks/run_all.py --quick $(BENCH_ARGS)

# Tiny sizes, only checks that every code path runs; writes to /tmp, never to docs/.
bench-smoke: $(STAMP)
	$(PY) benchmarks/run_all.py --smoke --out /tmp/infscale-bench-smoke/benchmarks.md $(BENCH_ARGS)

# Re-render docs/benchmarks.md from docs/benchmarks-data/*.json only: no measuring, no torch, about a
# second (the standard library is enough, so no venv either). RENDER_ARGS="--figures" also redraws
# docs/figures/speed.png from the data (needs matplotlib).
bench-render:
	$(PYTHON) benchmarks/render.py $(RENDER_ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache
