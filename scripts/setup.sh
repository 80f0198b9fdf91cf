#!/usr/bin/env bash
# Creates .venv, installs the project with pinned versions, fetches the Kafka jars (Maven) and
# checks Java and the Temporal binary. Safe to run again: it only redoes what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found: install Python 3.11+ or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: $("$PYTHON" --version) is too old: install Python 3.11+ or set PYTHON" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing Python packages into .venv (pinned by constraints.txt)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
.venv/bin/chio-receipts dev fetch
