"""Time for a member's death to reach a watcher through etcd: lease expiry -> DELETE event on the watch.

Usage: python bench/results/cluster/detect_etcd.py http://127.0.0.1:2379 [rounds] [lease_s]
A child process registers a member with a lease of lease_s and keeps it alive as sigclassd.cluster does
(every lease_s / 3); it is SIGKILLed at a random moment, and the parent prints the seconds from the kill
to the watch's DELETE event.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import threading
import time

from sigclassd.cluster import KEY_PREFIX, Etcd


def member(endpoint: str, name: str, lease_s: int) -> None:
    etcd = Etcd(endpoint)
    lease = etcd.grant(lease_s)
    assert etcd.create(KEY_PREFIX + name, "{}", lease)
    while True:
        time.sleep(lease_s / 3)
        etcd.keepalive(lease)


def main() -> None:
    endpoint = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    lease_s = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    etcd = Etcd(endpoint)
    times = []
    for r in range(rounds):
        name = f"detect-{os.getpid()}-{r}"
        revision, _ = etcd.list(KEY_PREFIX)
        deleted = threading.Event()
        seen: list[float] = []

        def watch(since: int = revision, key: str = KEY_PREFIX + name, done: threading.Event = deleted,
                  seen: list[float] = seen) -> None:
            try:
                for kind, k in etcd.watch(KEY_PREFIX, since + 1):
                    if kind == "DELETE" and k == key:
                        seen.append(time.monotonic())
                        done.set()
                        return
            finally:
                done.set()

        child = multiprocessing.Process(target=member, args=(endpoint, name, lease_s))
        child.start()
        threading.Thread(target=watch, daemon=True).start()
        time.sleep(1.0 + random.uniform(0, lease_s))
        os.kill(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        child.join()
        deleted.wait(lease_s * 3)
        etcd.interrupt()
        times.append(seen[0] - killed)
        print(f"round {r + 1}: member dead -> DELETE seen by the watcher {times[-1]:.2f} s")
    print(f"lease {lease_s} s: min {min(times):.2f} s, max {max(times):.2f} s, mean {sum(times) / len(times):.2f} s")


if __name__ == "__main__":
    main()
