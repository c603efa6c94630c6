# Keel: `make demo` and `make test` work on a fresh machine with only Python 3.11+ installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
COMPOSE_SCHEMA := $(VENV)/share/keel/compose_spec.json

export KEEL_HOME ?= $(CURDIR)/.keel
export DAGSTER_HOME ?= $(KEEL_HOME)/dagster
# Great Expectations and MLflow would otherwise try to send usage statistics.
export GX_ANALYTICS_ENABLED := False
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
# Byte-code caches save seconds of start-up per process (pandas, scipy, dagster).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install lock demo demo-prod test ui mlflow-ui lint format dagster-home clean

install: $(STAMP) $(BIN)/promtool $(COMPOSE_SCHEMA)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

# promtool checks deploy/prometheus (config, rules, rule unit tests) in tests/deploy. It is not on PyPI:
# take the binary (Go, libc only) out of Debian's prometheus package, without installing the package
# or starting its service. A promtool already on PATH is linked instead. Without either, say how to get it.
$(BIN)/promtool: | $(STAMP)
	@if command -v promtool >/dev/null 2>&1; then \
		ln -sf "$$(command -v promtool)" $@; \
	elif command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then \
		tmp=$$(mktemp -d) && \
		( cd $$tmp && apt-get download -qq prometheus >/dev/null 2>&1 ) && \
		dpkg-deb -x $$tmp/prometheus_*.deb $$tmp/root && \
		install -m 755 $$tmp/root/usr/bin/promtool $@; \
		rm -rf $$tmp; \
	fi
	@test -x $@ || echo "promtool: not installed (no promtool on PATH, and 'apt-get download prometheus' failed or apt is missing); tests/deploy skips its promtool checks. Install Prometheus' promtool and run 'make install' again, or 'ln -s \$$(command -v promtool) $@'."

# tests/deploy validates deploy/compose.yaml against the Compose Specification's JSON schema. No
# package of it installs beside ours; the docker-compose 1.29 wheel (PyPI) carries it: take the
# file out of the wheel, without installing the package.
$(COMPOSE_SCHEMA): | $(STAMP)
	@mkdir -p $(dir $@)
	@tmp=$$(mktemp -d) && \
		$(BIN)/python -m pip download --quiet --no-deps --dest $$tmp docker-compose==1.29.2 && \
		$(BIN)/python -c "import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read('compose/config/compose_spec.json'))" $$tmp/docker_compose-1.29.2-py2.py3-none-any.whl > $@.part && \
		mv $@.part $@; rm -rf $$tmp
	@test -s $@ || { echo "compose schema: 'pip download docker-compose==1.29.2' failed; tests/deploy needs $@"; exit 1; }

# Pin every dependency for reproducible installs: run `make lock` after changing pyproject.toml.
# (Not a file rule: a fresh clone's mtimes must never trigger a re-resolve.)
lock:
	@test -x $(BIN)/uv || { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --quiet uv; }
	$(BIN)/uv pip compile --quiet --python-version 3.11 --extra dev pyproject.toml -o requirements.lock

dagster-home:
	@mkdir -p $(DAGSTER_HOME)
	@cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml

demo: install dagster-home
	$(BIN)/keel demo

# The same demo on the production profile: PostgreSQL, S3-compatible storage, Redis, a Kafka broker,
# an MLflow server and Dagster's daemon, started under KEEL_HOME/servers and stopped when it ends.
demo-prod: install
	$(BIN)/keel demo --profile production

# pytest-xdist runs the suite in one worker more than the cores (at most four): the end-to-end
# tests spend part of their time waiting on the daemon, and two workers on two cores left the CPU
# a third idle. One test file per worker at a time, in collection order (tests/conftest.py puts
# the minutes-long end-to-end files first; xdist would otherwise hand out the files with the
# most tests first).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n + 1 > 4 ? 4 : n + 1 )))
test: install
	$(BIN)/python -m pytest --numprocesses=$(TEST_WORKERS) --dist=loadfile --no-loadscope-reorder --durations=15

# Started from DAGSTER_HOME, so Dagster reads the instance's copy of dagster.yaml, not the repo's.
ui: install dagster-home
	$(BIN)/python -m pipelines.pools
	cd $(DAGSTER_HOME) && $(CURDIR)/$(BIN)/dagster dev --host 127.0.0.1 --port 3000 -w $(CURDIR)/workspace.yaml

# The model registry and its runs: KEEL_MLFLOW_URI, or the embedded SQLite store under KEEL_HOME.
mlflow-ui: install
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 \
		--backend-store-uri "$${KEEL_MLFLOW_URI:-sqlite:///$(KEEL_HOME)/mlflow.db}" \
		--default-artifact-root "$(KEEL_HOME)/mlartifacts"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(KEEL_HOME)
