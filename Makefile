# The two commands of the README: `make demo` (the main job) and `make test` (every test).
# Each is complete on its own: it creates .venv, installs pinned packages, fetches the Kafka jars.
.PHONY: setup demo test lint test-faults bench clean

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/chio-receipts demo $(ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports

test: lint
	.venv/bin/pytest

test-faults: setup
	.venv/bin/pytest -m slow tests/faults

bench: setup
	.venv/bin/python -m bench.run --size full

clean:
	rm -rf .data .pytest_cache .mypy_cache .ruff_cache
