#!/usr/bin/env bash
# Prepares a fresh machine for Maru, idempotently: checks the toolchain, creates .venv with
# the Python build and test tools, builds the release binaries (maru, maru-server,
# maru-resource-manager) and installs the `maru` Python package into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "setup: '$1' not found: $2" >&2; exit 1; }
}
need cargo "install Rust (https://rustup.rs)"
need python3 "install CPython 3.11 or newer"
python3 -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 required"' \
    || { echo "setup: Python >= 3.11 is required (the buffer protocol is in its limited API)" >&2; exit 1; }
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    else
        echo "setup: Python's venv module is missing (Debian/Ubuntu: apt-get install python3-venv)" >&2
        exit 1
    fi
fi

# Redis runs side by side in `maru bench` (skipped there when absent). RUNLEVEL=1 keeps the
# package's init script from starting a redis-server that would outlive this script.
if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: redis-server (for maru bench)"
    { RUNLEVEL=1 apt-get install -y -qq redis-server >/dev/null 2>&1 \
        || { apt-get update -qq && RUNLEVEL=1 apt-get install -y -qq redis-server >/dev/null; }; } \
        || echo "setup: redis-server not installed; maru bench will skip its Redis rows" >&2
fi

echo "setup: Python environment (.venv)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "maturin>=1.5,<2" "pytest>=7" >/dev/null

echo "setup: building release binaries"
cargo build --release --quiet --bins

echo "setup: building and installing the maru Python package"
log=$(mktemp)
if ! VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" .venv/bin/maturin develop --release >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup: building the Python package failed" >&2
    exit 1
fi
rm -f "$log"
.venv/bin/python -c 'import maru; print("setup: maru", getattr(maru, "__version__", "?"), "installed in .venv")'
