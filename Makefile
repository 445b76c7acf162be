# tokenservice: `make run` serves, `make test` runs the whole suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Two stamps: `make run` installs only what serving needs (the runtime
# dependencies); the dev extras (pytest, ruff, Playwright, grpcio-tools, ...)
# come with `make install`, `make test` and `make lint`.
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
GEN    := clients/python/tokenservice/v1
PROTO  := protos/tokenservice/v1/token_service.proto

.PHONY: install install-run run test bench protos lint clean

install: $(DEV_STAMP)

install-run: $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ./clients/python -e .
	touch $(RUN_STAMP)

$(DEV_STAMP): $(RUN_STAMP)
	$(PIP) install --quiet -e ./clients/python -e '.[dev]'
	touch $(DEV_STAMP)

run: install-run
	$(VENV)/bin/tokenservice serve

test: install
	$(VENV)/bin/pytest

# The benchmark suite (not part of `make test`): BENCH_ARGS="--quick" for a short
# run, "--backend postgres" for PostgreSQL, "--update-doc" to rewrite BENCHMARKS.md.
# The load comes from h2load (Debian's nghttp2-client), installed here if missing; the
# bench extra brings py-spy and the peer (Django, DRF, drf-api-key, gunicorn).
bench: install
	command -v h2load >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		nghttp2-client; }
	$(PIP) install --quiet -e '.[bench]'
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

# Regenerates the Python stubs from protos/ (committed; tests/test_protos.py
# proves they match).
protos: install
	$(PY) -m tokenservice_server.protogen $(GEN)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) *.egg-info service/*.egg-info clients/python/*.egg-info build clients/python/build
