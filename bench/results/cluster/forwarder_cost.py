"""CPU a forwarder spends per message: libzmq's C proxy (plain) against `forward --partition` (Python loop).

Usage: python bench/results/cluster/forwarder_cost.py [messages]
For each mode a real `sigclassd forward` process; one gateway PUB sends `messages` protocol-sized messages
(40 stream ids, 10 samples x 16 float32) at most 50,000/s, one SUB receives them all. Prints the
forwarder's user+system CPU per message (from /proc) and the messages received.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq

from sigclassd import partition


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(mode: str, count: int) -> None:
    ctx = zmq.Context()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    sub.setsockopt(zmq.RCVHWM, 0)
    xsub, xpub = pub.bind_to_random_port("tcp://127.0.0.1"), sub.bind_to_random_port("tcp://127.0.0.1")
    pub.unbind(pub.LAST_ENDPOINT)
    sub.unbind(sub.LAST_ENDPOINT)
    args = [sys.executable, "-m", "sigclassd", "forward", "--xsub", f"tcp://127.0.0.1:{xsub}", "--xpub",
            f"tcp://127.0.0.1:{xpub}", "--hwm", "1000000"] + (["--partition"] if mode == "partition" else [])
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2.0)
        sub.setsockopt(zmq.SUBSCRIBE, partition.MARKER if mode == "partition" else b"")
        sub.connect(f"tcp://127.0.0.1:{xpub}")
        pub.connect(f"tcp://127.0.0.1:{xsub}")
        time.sleep(1.0)
        body = bytes(24 + 10 * 16 * 4)
        topics = [f"gw-{i % 4}/s{i}".encode() for i in range(40)]
        before = cpu_s(proc.pid)
        started = time.monotonic()
        for i in range(count):
            pub.send_multipart([topics[i % 40], body])
            if i % 500 == 0:
                time.sleep(max(0.0, started + i / 50_000 - time.monotonic()))
        got = 0
        while got < count and sub.poll(3000):
            sub.recv_multipart()
            got += 1
        used = cpu_s(proc.pid) - before
        print(f"{mode:9s}: {count} sent, {got} received; forwarder CPU {used:.2f} s = "
              f"{used / count * 1e6:.1f} us per message")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        pub.close(linger=0)
        sub.close(linger=0)
        ctx.term()


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    for mode in ("plain", "partition"):
        run(mode, n)
