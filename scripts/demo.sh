#!/usr/bin/env bash
# The README's first command: set everything up, start `maru up` on a fresh pool, run a
# producer and a separate consumer process that share chunks zero-copy, print their
# throughput, stop cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

work=$(mktemp -d "${MARU_DEMO_DIR:-/dev/shm}/maru-demo.XXXXXX")
up_pid=""
cleanup() {
    if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
        kill -TERM "$up_pid" 2>/dev/null || true
        wait "$up_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "demo: starting maru up (embedded resource manager + metadata server)"
target/release/maru up --port 0 --rm-port 0 --pool-size "${MARU_DEMO_POOL:-1G}" --log-level warn \
    --pool-dir "$work/pool" --state-dir "$work/state" --ready-file "$work/ready.json" &
up_pid=$!
for _ in $(seq 1 200); do
    [ -s "$work/ready.json" ] && break
    kill -0 "$up_pid" 2>/dev/null || { echo "demo: maru up failed to start" >&2; exit 1; }
    sleep 0.05
done
[ -s "$work/ready.json" ] || { echo "demo: maru up did not become ready" >&2; exit 1; }
url=$(.venv/bin/python -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["unix"] or r["tcp"])' "$work/ready.json")

echo "demo: producer process → $url"
.venv/bin/python examples/python-producer-consumer/producer.py --server "$url" --manifest "$work/manifest.json"
echo "demo: consumer process (a separate interpreter) → $url"
.venv/bin/python examples/python-producer-consumer/consumer.py --server "$url" --manifest "$work/manifest.json" --delete

echo "demo: stopping maru up"
kill -TERM "$up_pid"
wait "$up_pid"
up_pid=""
echo "demo: done"
