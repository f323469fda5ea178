#!/usr/bin/env python3
"""N client processes retrieving 4 KiB chunks from one server, with the CPUs they may use
chosen: the diagnostic behind docs/PERFORMANCE.md, "Where the time goes" (concurrency).

`maru bench`'s concurrency rows keep the clients on the client's CPU (and run the most
processes once more on every CPU); this script runs them on the CPUs chosen, for as long as
asked and over as many of the keys as asked, so a profiler can be attached. It drives the
benchmark's own worker processes (`maru bench --worker`): a server on `--server-cpu`, one
process holding 256 stored keys, N looping readers on `--client-cpus`, and a SCHED_IDLE
spinner per CPU as `maru bench` starts them. Each reader says `ready`, loops on `go`, says
`done`, and reports its latencies when asked (after every reader is done). It prints keys/s
over the readers' own loops, p50/p99/p999 and the share of calls over 100 µs, with the
1-minute load.

    python3 benchmarks/concurrency_placement.py target/release/maru 32 --client-cpus 0
    python3 benchmarks/concurrency_placement.py target/release/maru 32 --client-cpus 0,1
    python3 benchmarks/concurrency_placement.py target/release/maru 32 --client-cpus 0 --keys 8
    python3 benchmarks/concurrency_placement.py target/release/maru 32 --client-cpus 0 --dir D
        (D: a tmpfs mounted huge=always, for the pool and the index on 2 MiB pages)
"""
import argparse
import json
import os
import subprocess
import tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("exe", help="the maru executable")
    ap.add_argument("clients", type=int)
    ap.add_argument("--iters", type=int, default=16000, help="retrieves per client")
    ap.add_argument("--keys", type=int, default=256, help="how many of the 256 keys each reads")
    ap.add_argument("--transport", choices=["unix", "tcp"], default="unix")
    ap.add_argument("--server-cpu", default="1")
    ap.add_argument("--client-cpus", default="0,1")
    ap.add_argument("--dir", default="/dev/shm",
                    help="where the pool and the key index live (a tmpfs or hugetlbfs)")
    a = ap.parse_args()

    def worker(spec, cpus):
        return subprocess.Popen(
            ["taskset", "-c", cpus, a.exe, "bench", "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    cpus = sorted({a.server_cpu, *a.client_cpus.split(",")})
    spinners = [subprocess.Popen(["chrt", "--idle", "0", "taskset", "-c", c,
                                  "sh", "-c", "while :; do :; done"]) for c in cpus]
    procs = []
    try:
        with tempfile.TemporaryDirectory(dir=a.dir, prefix="maru-placement-") as d:
            server = worker({"kind": "serve", "dir": d, "pool_bytes": 256 << 20}, a.server_cpu)
            procs.append(server)
            url = json.loads(server.stdout.readline())[a.transport]
            keys = ["placement@m@1@0@%032x" % i for i in range(256)]
            holder = worker({"kind": "hold", "url": url, "region": 8 << 20, "chunk": 4096,
                             "keys": keys}, a.client_cpus)
            procs.append(holder)
            assert holder.stdout.readline().strip() == "ready"
            spec = {"kind": "loop", "url": url, "keys": keys[:a.keys], "iters": a.iters}
            readers = [worker(spec, a.client_cpus) for _ in range(a.clients)]
            procs.extend(readers)
            for r in readers:
                assert r.stdout.readline().strip() == "ready"
            for word, answer in (("go", "done"), ("report", None)):
                for r in readers:
                    r.stdin.write(word + "\n")
                    r.stdin.flush()
                if answer:
                    for r in readers:
                        assert r.stdout.readline().strip() == answer
            ns, began, ended = [], None, None
            for r in readers:
                rep = json.loads(r.stdout.readline())
                ns += rep["ns"]
                began = min(began or rep["began"], rep["began"])
                ended = max(ended or rep["ended"], rep["ended"])
            wall = (ended - began) / 1e9
            for p in reversed(procs):
                p.stdin.close()
                p.wait()
    finally:
        for s in spinners:
            s.kill()
    ns.sort()
    q = lambda f: ns[min(len(ns) - 1, int(f * len(ns)))] / 1000
    slow = sum(1 for x in ns if x > 100_000)
    print(f"{a.transport} clients={a.clients} on CPU {a.client_cpus}, server on CPU "
          f"{a.server_cpu}: {len(ns) / wall:,.0f} keys/s, p50 {q(.5):.1f} p99 {q(.99):.1f} "
          f"p999 {q(.999):.1f} us, {100 * slow / len(ns):.2f} % over 100 us, "
          f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
