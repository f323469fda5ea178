#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for a bounded time: FUZZ_SECONDS each (default
# 60), the targets in FUZZ_TARGETS (default: all three decoders). Needs a nightly toolchain
# and cargo-fuzz; without them it says so and exits 0 (the stable replay of the corpora runs
# in `cargo test` anyway: maru-server mutated_frames, maru-faults fuzz_corpus).
#
# Each target starts from its committed seeds (fuzz/corpus/<target>/) plus any regression
# inputs (fuzz/regressions/<target>/), in a scratch copy, so a run never dirties the tree.
# A crash fails the script and its input is saved to fuzz/regressions/<target>/ (commit it
# with the fix, so every later run replays it first).
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${FUZZ_SECONDS:-60}"
targets="${FUZZ_TARGETS:-decode_frame wal_record checkpoint}"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "== fuzz: SKIPPED: no nightly toolchain (rustup toolchain install nightly)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    # A fresh machine has the toolchain but not the cargo subcommand: install it (a few
    # minutes of compiling, once per machine).
    echo "== fuzz: installing cargo-fuzz"
    if ! cargo install cargo-fuzz --locked --quiet >/dev/null 2>&1; then
        echo "== fuzz: SKIPPED: cargo-fuzz could not be installed (cargo install cargo-fuzz)"
        exit 0
    fi
fi

cd fuzz
failed=0
for t in $targets; do
    scratch="$(mktemp -d "/tmp/maru-fuzz-$t-XXXXXX")"
    trap 'rm -rf "$scratch"' EXIT
    cp -r "corpus/$t/." "$scratch/" 2>/dev/null || true
    if [ -d "regressions/$t" ]; then cp -r "regressions/$t/." "$scratch/"; fi
    log="$scratch.log"
    echo "== fuzz $t: ${secs} s from $(ls "$scratch" | wc -l) seed inputs"
    set +e
    # -timeout: one input taking 10 s is a hang; -rss_limit_mb: unbounded allocation is a bug.
    cargo +nightly fuzz run "$t" "$scratch" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    set -e
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)"
    if [ "$rc" -eq 0 ]; then
        echo "== fuzz $t: ${runs:-?} inputs, no crash"
    else
        failed=1
        tail -n 40 "$log"
        mkdir -p "regressions/$t"
        for a in artifacts/"$t"/*; do
            [ -e "$a" ] || continue
            cp "$a" "regressions/$t/"
            echo "== fuzz $t: FAILED; input saved as fuzz/regressions/$t/$(basename "$a")"
        done
    fi
    rm -rf "$scratch" "$log"
    trap - EXIT
done
exit "$failed"
