# Front door. See README.md.
.PHONY: demo test stop lint proto infra-up infra-down bench

demo:  ## run the whole system on SQLite with a simulated workload, print a Get answer
	bash scripts/demo.sh

test:  ## provision Kafka + PostgreSQL and run linters, type checks and the full test suite
	bash scripts/test.sh

stop:  ## stop what demo/test started (API, projector, Kafka, PostgreSQL)
	bash scripts/stop.sh

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

bench:  ## benchmark on real Kafka + PostgreSQL (BENCHMARKS.md); narrow with BENCH_ARGS="--scale 0.1 --only get"
	bash infra/kafka.sh up && bash infra/postgres.sh up
	.venv/bin/python -m bench run --postgres-url "$$(bash infra/postgres.sh url)" $(BENCH_ARGS)

proto:  ## regenerate connection_tracker/protogen from proto/
	.venv/bin/python proto/generate.py

infra-up:
	bash infra/kafka.sh up && bash infra/postgres.sh up

infra-down:
	bash infra/kafka.sh down; bash infra/postgres.sh down
