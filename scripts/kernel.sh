#!/usr/bin/env bash
# Builds the real Chio kernel tools (kernel/: chio-kernel-sidecar, chio-receipt-verify) once, in
# release mode, into $CHIO_CACHE_DIR/kernel/bin (default .cache/kernel/bin). Skips the build when
# both binaries are newer than every file of the crate. The first build compiles ~540 crates.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${CHIO_CACHE_DIR:-.cache}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
BIN="$CACHE/kernel/bin"
TARGET="$CACHE/kernel/target"
LOG="$CACHE/kernel/build.log"
SHOW_BIN=${BIN#"$PWD"/}
BINARIES=(chio-kernel-sidecar chio-receipt-verify)
MIN_RUST=1.93

fail() {
  echo "make kernel: $*" >&2
  exit 1
}

# The sources' content hash, stored beside the binaries: a cache restored after a fresh clone
# (where every source file is newer than the restored binaries) is still recognised as current.
source_hash() {
  find kernel -path kernel/target -prune -o -type f -print | LC_ALL=C sort | xargs sha256sum |
    sha256sum | cut -c1-64
}
fresh=1
for name in "${BINARIES[@]}"; do
  if [ ! -x "$BIN/$name" ] || [ -n "$(find kernel -path kernel/target -prune -o -type f -newer "$BIN/$name" -print -quit)" ]; then
    fresh=0
  fi
done
if [ "$fresh" = 0 ] && [ -x "$BIN/${BINARIES[0]}" ] && [ -x "$BIN/${BINARIES[1]}" ] &&
  [ "$(cat "$BIN/.source-hash" 2>/dev/null)" = "$(source_hash)" ]; then
  fresh=1
fi
if [ "$fresh" = 1 ]; then
  echo "make kernel: up to date ($SHOW_BIN)"
  exit 0
fi

command -v cargo >/dev/null 2>&1 ||
  fail "cargo not found: install Rust $MIN_RUST or newer (https://rustup.rs), then run make kernel again"
version=$(cargo --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$MIN_RUST" "${version%%-*}" | sort -V | head -1)" != "$MIN_RUST" ]; then
  fail "cargo $version is too old: the chio crates need Rust $MIN_RUST or newer (rustup update stable)"
fi

mkdir -p "$BIN" "$(dirname "$LOG")"
echo "make kernel: building chio-api-protect 0.1.2 and chio-core-types 0.1.2 (release, ~540 crates;"
echo "  20-50 minutes on 2 cores the first time). Log: ${LOG#"$PWD"/}"
start=$SECONDS
if ! nice -n 19 cargo build --release --locked --manifest-path kernel/Cargo.toml \
  --target-dir "$TARGET" >"$LOG" 2>&1; then
  tail -n 20 "$LOG" >&2
  fail "cargo build failed after $((SECONDS - start))s; the full log is ${LOG#"$PWD"/}"
fi
for name in "${BINARIES[@]}"; do
  cp "$TARGET/release/$name" "$BIN/$name.tmp"
  mv "$BIN/$name.tmp" "$BIN/$name"
done
source_hash >"$BIN/.source-hash"
elapsed=$((SECONDS - start))
printf 'make kernel: built %s in %dm%02ds -> %s\n' "${BINARIES[*]}" $((elapsed / 60)) $((elapsed % 60)) "$SHOW_BIN"
