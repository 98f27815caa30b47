# setpoint: the two commands a user needs are `make demo` and `make test`.
# Both bootstrap from a fresh clone: a virtualenv in .venv, the package installed
# editable with its extras, and a mosquitto binary (apt-get when root).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVICES ?= 3
PYTEST_ARGS ?=

.PHONY: all demo test test-cluster check bench bench-quick mosquitto nats chromium screenshots venv clean

all: test

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

mosquitto:
	@./scripts/bootstrap-mosquitto.sh

nats:
	@./scripts/bootstrap-nats.sh

# Debian's chromium for the dashboard's browser tests (they skip, loudly, without it).
chromium:
	@./scripts/bootstrap-chromium.sh

demo: venv mosquitto
	$(BIN)/setpoint demo --devices $(DEVICES)

# Most tests wait on real processes (brokers, shims, git, a browser) more than they compute,
# so the suite runs in TEST_WORKERS processes (pytest-xdist; one test file per process at a
# time, so a file's fixtures stay together): about 5 minutes instead of 10-12 on 2 cores.
# TEST_WORKERS=1 runs it in one worker process. tests/engines (the 3-node NATS cluster) runs alone,
# one test after the other, in `make test-cluster` below, which .ci/run runs after this.
TEST_WORKERS ?= 3
test: venv mosquitto nats chromium
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --ignore=tests/engines $(PYTEST_ARGS)

# Everything on a 3-node NATS cluster (tests/engines: the loop, the operator commands,
# failover, replicas) and its fault tests (docs/scale-out.md, "Fault tests"): kill -9 of
# the shim's node, the controller's, the retained-stream leader, all nodes; a rolling
# restart; a node frozen and one split off its routes; the leading controller replica, its
# node killed or cut off; a hand edit and a commit during each outage. A fresh cluster per
# test: ~6-10 minutes on 2 shared cores. .ci/run runs it after `make test`. Each fault's
# reconvergence times are printed at the end as `fault-figure ...` lines. The engine loses
# a retained bundle published while it elects a stream leader; the controller publishes it
# again (docs/scale-out.md, "The remedy belongs to the controller": rules 1 and 2).
test-cluster: venv mosquitto nats
	@figures=$$(mktemp); \
	SETPOINT_CLUSTER_FAULTS=1 SETPOINT_FAULT_FIGURES=$$figures \
		$(BIN)/pytest tests/engines tests/device_shim/test_link_failover.py $(PYTEST_ARGS); \
	status=$$?; cat $$figures; rm -f $$figures; exit $$status

# Retake the dashboard screenshots in docs/img/ (the browser tests take them; a plain
# `make test` writes them to a temporary directory so the tree stays clean).
screenshots: venv mosquitto chromium
	SETPOINT_SCREENSHOTS=docs $(BIN)/pytest tests/dashboard/test_browser.py

check: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict proto sharedkit
	./scripts/lint-imports.sh

bench: venv mosquitto
	$(BIN)/python -m bench

bench-quick: venv mosquitto
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
