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
# The native core (native/, Rust): built from source by pip with maturin and the machine's cargo,
# before the main package (which depends on it), and again only when the crate changes. cargo
# keeps its build in native/target, so a change recompiles only the crate itself.
native_stamp=".venv/.native-$(cat native/Cargo.toml native/Cargo.lock native/pyproject.toml \
  native/chio_receipts_native.pyi native/src/*.rs | sha256sum | cut -c1-16)"
if [ ! -f "$native_stamp" ]; then
  if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found: the native module (native/) is built from source with Rust; install it (https://rustup.rs, Rust 1.93+) and run make setup again" >&2
    exit 1
  fi
  echo "building the native module (native/, Rust) into .venv"
  start=$(date +%s)
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet --force-reinstall --no-deps ./native
  echo "native module built in $(($(date +%s) - start)) s"
  rm -f .venv/.native-*
  touch "$native_stamp"
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
