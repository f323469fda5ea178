"""Reads another process's chunks through zero-copy views and verifies them."""

import argparse
import hashlib
import json
import sys
import time

from maru import MaruConfig, MaruHandler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="tcp://localhost:5555")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--delete", action="store_true", help="delete the keys afterwards")
    args = parser.parse_args()

    with open(args.manifest) as f:
        manifest: dict[str, str] = json.load(f)
    keys = list(manifest)
    with MaruHandler(MaruConfig(server_url=args.server, eager_map=False)) as handler:
        started = time.perf_counter()
        infos = [handler.retrieve(key=k) for k in keys]
        lookup = time.perf_counter() - started
        missing = [k for k, info in zip(keys, infos) if info is None]
        if missing:
            print(f"consumer: {len(missing)} keys missing, e.g. {missing[0]}", file=sys.stderr)
            return 1
        started = time.perf_counter()
        bad = [k for k, info in zip(keys, infos) if hashlib.sha256(info.view).hexdigest() != manifest[k]]
        verify = time.perf_counter() - started
        total = sum(len(info.view) for info in infos)
        readonly = all(info.view.readonly for info in infos)
        del infos
        if args.delete:
            for k in keys:
                handler.delete(k)
    print(
        f"consumer: retrieved {len(keys)} chunks as zero-copy views in {lookup * 1e3:.1f} ms "
        f"({lookup / len(keys) * 1e6:.1f} µs per chunk, {total / lookup / 1e9:.1f} GB/s effective); "
        f"read-only views: {readonly}"
    )
    print(f"consumer: read and verified {total / 1e6:.0f} MB at {total / verify / 1e9:.2f} GB/s (SHA-256 bound)")
    if bad:
        print(f"consumer: {len(bad)} chunks differ, e.g. {bad[0]}", file=sys.stderr)
        return 1
    print("consumer: every chunk matches the producer's manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
