# `make demo` and `make test` work on a fresh machine: both install the stack into .venv first (once).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install test test-fast demo compare bench bench-all bench-xl bench-span bench-fw bench-sha
install:
	bash scripts/install.sh

test: install
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest tests -q -m "not slow" $(PYTEST_ARGS)

demo: install
	$(PY) scripts/demo.py

compare: install
	$(PY) scripts/compare_quality.py --quick --jobs 2 --out compare-out
	$(PY) scripts/bench.py --quick --out compare-out/bench

bench: install
	$(PY) scripts/bench_alibi.py

bench-all: install
	$(PY) scripts/bench.py

bench-xl: install
	$(PY) scripts/bench_transformer_xl.py

bench-span: install
	$(PY) scripts/bench_adaptive_span.py

bench-fw: install
	$(PY) scripts/bench_fast_weights.py

bench-sha: install
	$(PY) scripts/bench_sha_rnn.py
