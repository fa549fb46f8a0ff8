# Two entry points (both idempotent, both do all set-up): `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
FRT := $(VENV)/bin/frugalrt
DEMO := build/demo

.PHONY: setup demo test test-fast bench clean
setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q -ra tests

test-fast: setup
	$(PY) -m pytest -q -ra tests -m "not compile and not emulated"

bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf build
