#!/usr/bin/env python3
"""floor-scattered.py [-n RUNS] [CLUSTERS] [DIR] - the machine's floor for a metadata-heavy merge.

A merge of CLUSTERS scattered 4 KiB clusters (default 39,987: `commit -b base` of
`scripts/mkworkload.sh meta4k`) into an image whose L2 tables do not cover them yet
writes each cluster after a new 4 KiB L2 table of its own, as QEMU allocates them: data
and tables alternate in the file. A crash-safe merge flushes the data before the tables
that map it, once per checkpoint (every 16 MiB of dirty tables: 18 for meta4k). This
script writes that pattern and nothing else (no reads, no lookups, no refcounts) into a
file in DIR (default: the current directory) and times it, next to the same number of
4 KiB writes laid out in order with the same flushes. Prints the median seconds of RUNS
(default 3) and the clusters per second each allows.
"""
import os
import statistics
import sys
import time

TABLES_PER_CHECKPOINT = (16 << 20) // 4096


def interleaved(fd, clusters):
    """Data at odd 4 KiB slots, fdatasync, then its tables at the even ones, fdatasync."""
    block = b"\x5a" * 4096
    slot = 0
    while clusters > 0:
        n = min(clusters, TABLES_PER_CHECKPOINT)
        for i in range(n):
            os.pwrite(fd, block, (slot + 2 * i + 1) * 4096)
        os.fdatasync(fd)
        for i in range(n):
            os.pwrite(fd, block, (slot + 2 * i) * 4096)
        os.fdatasync(fd)
        slot += 2 * n
        clusters -= n


def in_order(fd, clusters):
    """The same writes and flushes, each checkpoint's writes one sequential run."""
    block = b"\x5a" * 4096
    slot = 0
    while clusters > 0:
        n = min(clusters, TABLES_PER_CHECKPOINT)
        for i in range(2 * n):
            os.pwrite(fd, block, (slot + i) * 4096)
        os.fdatasync(fd)
        os.fdatasync(fd)
        slot += 2 * n
        clusters -= n


def timed(pattern, path, clusters):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.monotonic()
        pattern(fd, clusters)
        return time.monotonic() - start
    finally:
        os.close(fd)
        os.unlink(path)


def main(argv):
    runs = 3
    if argv[:1] == ["-n"]:
        runs = int(argv[1])
        argv = argv[2:]
    if any(a.startswith("-") for a in argv) or len(argv) > 2 or runs < 1:
        sys.exit("usage: scripts/floor-scattered.py [-n RUNS] [CLUSTERS] [DIR]")
    clusters = int(argv[0]) if argv else 39987
    path = os.path.join(argv[1] if len(argv) > 1 else ".", ".floor-scattered.tmp")
    times = {"interleaved": [], "in order": []}
    for _ in range(runs):
        # Interleaved, so that both meet the same state of the machine.
        times["interleaved"].append(timed(interleaved, path, clusters))
        times["in order"].append(timed(in_order, path, clusters))
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:12} {median:6.2f} s  {clusters / median / 1000:6.1f} k clusters/s"
              f"  ({2 * clusters} writes of 4 KiB, runs: {', '.join(f'{s:.2f}' for s in samples)})")


if __name__ == "__main__":
    main(sys.argv[1:])
