"""Writes chunks into shared memory and registers them; prints the throughput."""

import argparse
import hashlib
import json
import os
import time

from maru import MaruConfig, MaruHandler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="tcp://localhost:5555")
    parser.add_argument("--chunks", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=1 << 20)
    parser.add_argument("--prefix", default="demo")
    parser.add_argument("--manifest", required=True, help="where to write key -> sha256")
    args = parser.parse_args()

    size = args.chunk_size
    base = os.urandom(size)
    config = MaruConfig(
        server_url=args.server,
        chunk_size_bytes=size,
        pool_size=max(size, min(args.chunks * size, 256 << 20)),
    )
    manifest = {}
    with MaruHandler(config) as handler:
        started = time.perf_counter()
        for i in range(args.chunks):
            handle = handler.alloc(size=size)
            handle.buf[:size] = base  # the one copy: straight into shared memory
            handle.buf[:8] = i.to_bytes(8, "little")  # make every chunk different
            handler.store(key=f"{args.prefix}-{i}", handle=handle)
        elapsed = time.perf_counter() - started
        for i in range(args.chunks):
            digest = hashlib.sha256(i.to_bytes(8, "little") + base[8:]).hexdigest()
            manifest[f"{args.prefix}-{i}"] = digest
    total = args.chunks * size
    print(
        f"producer: stored {args.chunks} chunks of {size >> 10} KiB in {elapsed * 1e3:.1f} ms: "
        f"{total / elapsed / 1e9:.2f} GB/s, {args.chunks / elapsed:,.0f} chunks/s"
    )
    with open(args.manifest, "w") as f:
        json.dump(manifest, f)


if __name__ == "__main__":
    main()
