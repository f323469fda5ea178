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

# Everything the test runners print also goes to a log, for the totals line at the end.
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== cargo test (release profile: shares the build above)"
cargo test --release --workspace --exclude maru-py 2>&1 | tee -a "$log"

# The key index's entry protocol, model-checked with loom. Its own target directory, because
# `--cfg loom` changes every crate's build and would otherwise throw the main cache away.
echo "== loom (maru-index)"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p maru-index --release --test loom 2>&1 | tee -a "$log"

# A test that hangs must fail the run with its stack, not eat the CI budget: after
# faulthandler_timeout seconds pytest prints every thread's stack, and `timeout` ends the
# runner (the suites take 1-10 minutes).
pytest_bounded() {
    local limit=$1
    shift
    timeout --kill-after=30 "$limit" "$@" -o faulthandler_timeout=300
}

echo "== pytest"
MARU_BIN_DIR="$PWD/target/release" pytest_bounded 20m .venv/bin/python -m pytest -q tests/python 2>&1 | tee -a "$log"

# The framework adapters against the real frameworks, each in its own cached venv
# (scripts/frameworks.sh). A venv that cannot be installed here is a loud skip, never silent.
echo "== frameworks"
envs=$(./scripts/frameworks.sh all)
while read -r name python reason; do
    case $name in
        vllm) suites="tests/frameworks/lmcache tests/frameworks/vllm" ;;
        sglang) suites="tests/frameworks/sglang" ;;
        *) continue ;;
    esac
    if [ "$python" = SKIP ]; then
        echo "== frameworks: $name tests SKIPPED: $reason"
        continue
    fi
    present=""
    for suite in $suites; do [ -d "$suite" ] && present="$present $suite"; done
    [ -n "$present" ] || continue
    echo "== pytest ($name venv):$present"
    # shellcheck disable=SC2086
    MARU_BIN_DIR="$PWD/target/release" pytest_bounded 30m "$python" -m pytest -q -p no:cacheprovider $present </dev/null 2>&1 | tee -a "$log"
done <<<"$envs"

./scripts/fuzz.sh   # every decoder fuzzed FUZZ_SECONDS (60) each; skips without nightly + cargo-fuzz

# One line with the totals of both runners (cargo's "test result:" lines and pytest's summary).
.venv/bin/python - "$log" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
passed = failed = 0
for m in re.finditer(r"test result: \w+\. (\d+) passed; (\d+) failed", text):
    passed += int(m.group(1)); failed += int(m.group(2))
for m in re.finditer(r"^=*\s*(?:(\d+) failed, )?(\d+) passed", text, re.M):
    failed += int(m.group(1) or 0); passed += int(m.group(2))
print(f"tests: {passed} passed, {failed} failed")
PY
