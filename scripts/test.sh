#!/usr/bin/env bash
# The whole test suite: formatting and lints, every Rust test (unit, property, in-process
# daemons, real binaries across processes, crash and fault tests), then the Python suite
# against the real daemons. Long variants: MARU_LONG_TESTS=1.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --workspace --all-targets --quiet -- -D warnings

echo "== cargo test (release profile: shares the build above)"
cargo test --release --workspace --exclude maru-py

echo "== pytest"
MARU_BIN_DIR="$PWD/target/release" .venv/bin/python -m pytest -q tests/python
./scripts/fuzz.sh   # every decoder fuzzed FUZZ_SECONDS (60) each; skips without nightly + cargo-fuzz
