"""The documented usage example (alloc, write, store, retrieve, exists, delete), plus a look at
what came back."""

import argparse

from maru import MaruConfig, MaruHandler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="tcp://localhost:5555")
    args = parser.parse_args()

    config = MaruConfig(server_url=args.server, pool_size=1024 * 1024 * 100)
    with MaruHandler(config) as handler:
        data = b"hello world"
        # Store: alloc → write → register
        handle = handler.alloc(size=len(data))
        handle.buf[: len(data)] = data
        handler.store(key=12345, handle=handle)
        # Retrieve (zero-copy memoryview into shared memory)
        result = handler.retrieve(key=12345)
        assert result is not None
        print("retrieved:", bytes(result.view[: len(data)]))
        print("exists:", handler.exists(key=12345))
        print("deleted:", handler.delete(key=12345))
        print("exists after delete:", handler.exists(key=12345))


if __name__ == "__main__":
    main()
