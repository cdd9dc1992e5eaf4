# `make demo` and `make test` set everything up on a fresh machine (Python 3.11+ needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The top-level folders map into the one `inferline` namespace (pyproject's package-dir);
# mypy cannot follow that mapping, so it checks a symlink tree laid out as installed.
TYPECHECK := build/typecheck/inferline

.PHONY: demo test lint tree typecheck unit bench bench-live bench-hop clean install protos

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,plot,agent,router,triton,examples]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/inferline demo

test: lint typecheck unit

lint: $(STAMP) tree
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd build/typecheck && PYTHONPATH=$(CURDIR)/build/typecheck $(CURDIR)/$(BIN)/lint-imports --config $(CURDIR)/pyproject.toml

tree:
	rm -rf build/typecheck && mkdir -p $(TYPECHECK)
	for f in $(CURDIR)/inferline/*; do ln -s $$f $(TYPECHECK)/; done
	for d in planner agent router adapters; do ln -s $(CURDIR)/$$d $(TYPECHECK)/$$d; done

typecheck: $(STAMP) tree
	cd build/typecheck && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p inferline

unit: $(STAMP)
	$(BIN)/pytest

# Regenerate inferline/protos/agent_pb2*.py(i) from agent.proto (they are committed).
protos: $(STAMP)
	$(BIN)/python -m inferline.protos.generate

bench: $(STAMP)
	$(BIN)/python -m bench.run

# Live benchmarks on real Triton processes: estimator fidelity, router overhead, live tuner.
bench-live: $(STAMP)
	$(BIN)/python -m bench.live

# The router endpoint's hop alone (a null pipeline, no model servers): latency and CPU per query.
bench-hop: $(STAMP)
	$(BIN)/python -m bench.hop

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache
