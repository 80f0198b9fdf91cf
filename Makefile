# The two commands of the README: `make demo` (the main job) and `make test` (every test).
# Each is complete on its own: it creates .venv, installs pinned packages, fetches the Kafka jars.
.PHONY: setup demo test lint test-faults bench clean kernel test-kernel

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

# The real Chio kernel (kernel/, Rust): built once into .cache/kernel/bin, ~20 minutes the first
# time, so it is not part of `make test`; its tests skip there when the binaries are absent.
# test-kernel runs the kernel-marked tests, the demo's oracle over its receipts included.
kernel:
	@scripts/kernel.sh

test-kernel: setup kernel
	.venv/bin/pytest -m kernel tests/kernel tests/demo

bench: setup
	.venv/bin/python -m bench.run --size full

clean:
	rm -rf .data .pytest_cache .mypy_cache .ruff_cache
