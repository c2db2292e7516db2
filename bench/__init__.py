"""The benchmark harness: `python -m bench run` (BENCHMARKS.md explains each figure).

Every figure is measured on the real Kafka broker and PostgreSQL server, in fresh topics and
databases that are removed afterwards, and is set beside a ceiling measured in the same run.
"""
