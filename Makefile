# Two commands for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= cpu,export,dev,bench

.PHONY: demo test install proto clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

## make demo: create .venv, install, export the default model (if missing), serve it and stream a generation
demo: $(STAMP)
	PYTHON=$(PY) bash scripts/demo.sh

## make test: create .venv if missing, install, lint, type-check, run the whole test suite
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest

## make proto: regenerate the gRPC code from proto/
proto: $(STAMP)
	PYTHON=$(PY) bash scripts/gen_proto.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
