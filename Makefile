# Front door. See README.md.
.PHONY: demo check test stop lint proto docs infra-up infra-down bench lock

demo:  ## run the whole system on SQLite: simulated workload, Get; a WebSocket client: Get, Send, Disconnect
	bash scripts/demo.sh

check:  ## the fast path (about a minute, nothing started): static checks, unit and property tests
	bash scripts/check.sh

test:  ## provision Kafka + PostgreSQL and run linters, type checks and the full test suite
	bash scripts/test.sh

stop:  ## stop what demo/test started (gateway, API, projector, Kafka, PostgreSQL)
	bash scripts/stop.sh

lint:  ## ruff, mypy and the import contracts
	bash scripts/bootstrap.sh && bash scripts/lint.sh

bench:  ## benchmark on real Kafka + PostgreSQL (BENCHMARKS.md); narrow with BENCH_ARGS="--scale 0.1 --only get"
	bash infra/kafka.sh up && CONNTRACK_PG_DURABLE=$${CONNTRACK_PG_DURABLE:-1} bash infra/postgres.sh up
	.venv/bin/python -m bench run --postgres-url "$$(bash infra/postgres.sh url)" $(BENCH_ARGS)

# Hashed pins, one resolution for Python 3.11 on every platform (--universal), each pin with the
# sha256 of every file PyPI has for it:
# - requirements.lock: the runtime dependencies of pyproject.toml (the image, Dockerfile);
# - requirements-build.lock: pip and the build backend ([build-system] requires);
# - requirements-dev.lock: both of those plus the [dev] extra, at the same versions
#   (scripts/bootstrap.sh installs .venv from it, so `make test` on a fresh clone gets exactly
#   the tools it got the day the lock was written).
# Existing pins are kept where they still satisfy pyproject.toml; `make lock LOCK_ARGS=--upgrade`
# moves everything to the newest versions. tests/test_image.py fails when a lock no longer
# matches pyproject.toml.
UV_VERSION := 0.13.8
UV := .local/uv-$(UV_VERSION)/bin
LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock" --quiet $(LOCK_ARGS)
BUILD_REQUIRES := $(UV)/python -c 'import tomllib; print("pip", *tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")'

lock:  ## regenerate the hashed lock files (runtime, build backend, development tools)
	test -x $(UV)/uv || \
	  { python3 -m venv .local/uv-$(UV_VERSION) && $(UV)/pip install --quiet uv==$(UV_VERSION); }
	$(UV)/uv pip compile pyproject.toml $(LOCK_FLAGS) --output-file requirements.lock
	$(BUILD_REQUIRES) | $(UV)/uv pip compile - $(LOCK_FLAGS) --output-file requirements-build.lock
	$(BUILD_REQUIRES) | $(UV)/uv pip compile pyproject.toml - --extra dev \
	  -c requirements.lock -c requirements-build.lock $(LOCK_FLAGS) --output-file requirements-dev.lock

docs:  ## regenerate docs/configuration.md from the settings (core/settings.py)
	.venv/bin/python -m conntrack.core.configuration > docs/configuration.md

proto:  ## regenerate core/protogen (conntrack.core.protogen) from proto/
	.venv/bin/python proto/generate.py

infra-up:
	bash infra/kafka.sh up && bash infra/postgres.sh up

infra-down:
	bash infra/kafka.sh down; bash infra/postgres.sh down
