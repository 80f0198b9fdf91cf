#!/usr/bin/env bash
# Builds the real Chio kernel tools (kernel/: chio-kernel-sidecar, chio-receipt-verify) once, in
# release mode, into $CHIO_CACHE_DIR/kernel/bin (default .cache/kernel/bin). Skips the build when
# both binaries are newer than every file of the crate. The first build compiles ~700 crates.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${CHIO_CACHE_DIR:-.cache}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
BIN="$CACHE/kernel/bin"
TARGET="$CACHE/kernel/target"
LOG="$CACHE/kernel/build.log"
BINARIES=(chio-kernel-sidecar chio-receipt-verify)
MIN_RUST=1.93

fail() {
  echo "make kernel: $*" >&2
  exit 1
}

fresh=1
for name in "${BINARIES[@]}"; do
  if [ ! -x "$BIN/$name" ] || [ -n "$(find kernel -path kernel/target -prune -o -type f -newer "$BIN/$name" -print -quit)" ]; then
    fresh=0
  fi
done
if [ "$fresh" = 1 ]; then
  echo "make kernel: up to date ($BIN)"
  exit 0
fi

command -v cargo >/dev/null 2>&1 ||
  fail "cargo not found: install Rust $MIN_RUST or newer (https://rustup.rs), then run make kernel again"
version=$(cargo --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$MIN_RUST" "${version%%-*}" | sort -V | head -1)" != "$MIN_RUST" ]; then
  fail "cargo $version is too old: the chio crates need Rust $MIN_RUST or newer (rustup update stable)"
fi

mkdir -p "$BIN" "$(dirname "$LOG")"
echo "make kernel: building chio-api-protect 0.1.2 and chio-core-types 0.1.2 (release, ~700 crates;"
echo "  15-25 minutes on 2 cores the first time). Log: $LOG"
start=$SECONDS
if ! nice -n 19 cargo build --release --locked --manifest-path kernel/Cargo.toml \
  --target-dir "$TARGET" >"$LOG" 2>&1; then
  tail -n 20 "$LOG" >&2
  fail "cargo build failed after $((SECONDS - start))s; the full log is $LOG"
fi
for name in "${BINARIES[@]}"; do
  cp "$TARGET/release/$name" "$BIN/$name.tmp"
  mv "$BIN/$name.tmp" "$BIN/$name"
done
elapsed=$((SECONDS - start))
printf 'make kernel: built %s in %dm%02ds -> %s\n' "${BINARIES[*]}" $((elapsed / 60)) $((elapsed % 60)) "$BIN"
