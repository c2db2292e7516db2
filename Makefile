# Front door. See README.md.
.PHONY: demo test stop lint proto infra-up infra-down bench lock

demo:  ## run the whole system on SQLite: simulated workload, Get; a WebSocket client: Get, Send, Disconnect
	bash scripts/demo.sh

test:  ## provision Kafka + PostgreSQL and run linters, type checks and the full test suite
	bash scripts/test.sh

stop:  ## stop what demo/test started (gateway, API, projector, Kafka, PostgreSQL)
	bash scripts/stop.sh

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

bench:  ## benchmark on real Kafka + PostgreSQL (BENCHMARKS.md); narrow with BENCH_ARGS="--scale 0.1 --only get"
	bash infra/kafka.sh up && CONNTRACK_PG_DURABLE=$${CONNTRACK_PG_DURABLE:-1} bash infra/postgres.sh up
	.venv/bin/python -m bench run --postgres-url "$$(bash infra/postgres.sh url)" $(BENCH_ARGS)

# The image's hashed pins (Dockerfile): requirements.lock holds the runtime dependencies of
# pyproject.toml (no [dev] extras), requirements-build.lock pip and the build backend
# ([build-system] requires). One resolution for Python 3.11 on every platform (--universal), each
# pin with the sha256 of every file PyPI has for it. Existing pins are kept where they still
# satisfy pyproject.toml; `make lock LOCK_ARGS=--upgrade` moves everything to the newest versions.
# tests/test_lockfile.py fails when the locks no longer match pyproject.toml.
UV_VERSION := 0.13.8
LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock" --quiet $(LOCK_ARGS)

lock:  ## regenerate requirements.lock and requirements-build.lock (hashed pins, for the image)
	test -x .local/uv-$(UV_VERSION)/bin/uv || \
	  { python3 -m venv .local/uv-$(UV_VERSION) && .local/uv-$(UV_VERSION)/bin/pip install --quiet uv==$(UV_VERSION); }
	.local/uv-$(UV_VERSION)/bin/uv pip compile pyproject.toml $(LOCK_FLAGS) --output-file requirements.lock
	.local/uv-$(UV_VERSION)/bin/python -c 'import tomllib; print("pip", *tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
	  | .local/uv-$(UV_VERSION)/bin/uv pip compile - $(LOCK_FLAGS) --output-file requirements-build.lock

proto:  ## regenerate connection_tracker/protogen from proto/
	.venv/bin/python proto/generate.py

infra-up:
	bash infra/kafka.sh up && bash infra/postgres.sh up

infra-down:
	bash infra/kafka.sh down; bash infra/postgres.sh down
